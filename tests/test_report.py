"""One report writer for any run directory: ``wtours report RUN_DIR`` on a chain's run directory rewrites its
``report.md`` and ``report.html``; on a stage's, its ``report.md`` (nothing else)."""

from __future__ import annotations

import json

import yaml

from wtours.cli import main


def _chain(tmp_path):
    out = tmp_path / "chain"
    (out / "video" / "stage1").mkdir(parents=True)
    spec = {"name": "tiny-chain", "command": "wtours pretrain --pipeline tiny",
            "data": {"videos": ["tour.mp4"], "eval": []},
            "stages": {"video": {"kind": "video", "config": "video/tiny", "input": None}}}
    (out / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    (out / "video" / "status.json").write_text(json.dumps({"stage": "video", "kind": "video", "state": "done",
                                                           "seconds": 12.0}))
    (out / "video" / "stage1" / "metrics.csv").write_text("step,train/loss\n1,2.0\n2,1.5\n3,1.2\n")
    return out


def test_report_rewrites_a_pipeline_run_directory(tmp_path, capsys):
    out = _chain(tmp_path)
    (out / "report.md").write_text("stale\n")
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "report.md"), str(out / "report.html")]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert md != "stale\n" and "tiny-chain" in md and "video" in md
    assert page.lstrip().lower().startswith("<!doctype html") and "tiny-chain" in page


def test_report_of_a_stage_run_directory_is_report_md_alone(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "stage1" / "metrics.csv").write_text("step,train/loss\n1,2.0\n2,1.5\n")
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "report.md")]
    assert (run / "report.md").is_file() and not (run / "report.html").exists()


def test_report_refuses_what_is_not_a_run_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
