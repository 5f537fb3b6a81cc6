"""``wtours bench learn --curve`` shortened: snapshots along a 2-step run, the GT-supervised curve of the same
budget, every instrument at every point, the table / picture / verdict, reuse on a second run."""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest

from wtours.bench.curve import BackboneSnapshots, aggregate, curve_steps, read_entropy, verdict
from wtours.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_bench_learn import EVAL, MICRO  # noqa: E402  (the micro stage-1 recipe and eval of the proof's test)

REPO = Path(__file__).resolve().parents[1]


def test_curve_steps_spread_over_the_run_and_end_at_its_end():
    assert curve_steps(5000, 8) == [625, 1250, 1875, 2500, 3125, 3750, 4375, 5000]
    assert curve_steps(3, 8) == [1, 2, 3]
    assert curve_steps(2, 2) == [1, 2]


def test_verdict_names_the_widest_range_and_checks_the_goal():
    def cell(m, s):
        return {"mean": m, "std": s, "n": 3}

    agg = {"random": {0: {"C": cell(16.0, 0.5), "J&F": cell(41.0, 0.2)}},
           "trained": {100: {"C": cell(17.0, 0.5), "J&F": cell(44.0, 0.4)}},
           "supervised": {100: {"C": cell(26.0, 0.5), "J&F": cell(47.0, 0.3)}}}
    v = verdict(agg, entropy_max=2.0, log_c=math.log(64))
    assert v["primary"] == "J&F"  # 6 points over 0.2 std = 30 std units, against C's 10 / 0.5 = 20
    assert v["checks"]["gap_closed"] == pytest.approx(0.5)
    assert v["checks"]["separation"] == pytest.approx(3 / math.sqrt((0.4 ** 2 + 0.2 ** 2) / 2))
    assert v["met"] is True and "**met**" in v["text"]
    hot = verdict(agg, entropy_max=4.1, log_c=math.log(64))  # targets near uniform: the goal fails
    assert hot["met"] is False and hot["checks"]["entropy_ok"] is False


@pytest.mark.slow
def test_curve_short(tmp_path):
    out = tmp_path / "curve"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- curve:begin -->\nold\n<!-- curve:end -->\ntail\n")
    argv = ["bench", "learn", "--curve", "--points", "2", "--seeds", "0", "1", "--max-steps", "2",
            "--supervised-sequences", "2", "--out", str(out), "--quiet", "--readme", str(readme),
            "--eval-config", "eval/tiny", *sum((["--set", s] for s in MICRO), [])]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    res = json.loads((out / "curve.json").read_text())
    assert res["settings"]["marks"] == [1, 2]
    for s in ("0", "1"):
        assert (out / f"seed{s}" / "snapshots" / "step1" / "backbone.pt").is_file()
        assert (out / f"supervised{s}" / "step1" / "backbone.pt").is_file()
        assert list(res["scores"]["random"][s]) == ["0"]
        assert list(res["scores"]["trained"][s]) == ["1", "2"] and list(res["scores"]["supervised"][s]) == ["1", "2"]
        for enc in ("trained", "supervised"):
            row = res["scores"][enc][s]["2"]
            assert set(row) == {"F", "C", "D", "J&F", "in-context", "linear"}
            assert all(0 <= v <= 100 for v in row.values())
    agg = res["aggregates"]
    vals = [res["scores"]["trained"][s]["2"]["J&F"] for s in ("0", "1")]
    assert agg["trained"]["2"]["J&F"]["mean"] == pytest.approx(sum(vals) / 2)
    assert res["verdict"]["primary"] in ("F", "C", "D", "J&F", "in-context", "linear")
    assert res["teacher_entropy"]["0"], "teacher entropy read from metrics.csv"
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "curve.md").read_text()
    assert "| supervised | 2 |" in md and "| trained | 1 |" in md and "| random | 0 |" in md
    text = readme.read_text()
    assert text.startswith("# x\n<!-- curve:begin -->\n") and text.endswith("<!-- curve:end -->\ntail\n")
    assert "old" not in text and res["verdict"]["text"] in text
    # a second run reuses the runs, snapshots and scores
    watched = [out / "seed0" / "snapshots" / "step1" / "backbone.pt", out / "supervised1" / "backbone.pt",
               out / "seed1" / "scores" / "step2" / "scores.json"]
    before = {p: p.stat().st_mtime_ns for p in watched}
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before


def test_curve_refuses_bad_options_before_work(tmp_path, capsys):
    base = ["bench", "learn", "--curve", "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*base, "--points", "1"]) == 2
    assert "--points: a curve needs >= 2 points" in capsys.readouterr().err
    assert main([*base, "--seeds", "1", "1"]) == 2
    assert "distinct seeds" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_snapshot_callback_writes_each_step_once(tmp_path):
    import torch

    class T:
        global_step = 3
        is_global_zero = True

    class M:
        class teacher:
            from wtours.models.weights import create_vit

            vit = create_vit("vit_nano_patch8_64", num_classes=0)

    cb = BackboneSnapshots([3, 5], tmp_path, "vit_nano_patch8_64")
    cb.on_train_batch_end(T(), M(), None, None, 0)
    p = tmp_path / "step3" / "backbone.pt"
    assert p.is_file() and not (tmp_path / "step5").exists()
    stamp = p.stat().st_mtime_ns
    cb.on_train_batch_end(T(), M(), None, None, 0)
    assert p.stat().st_mtime_ns == stamp
    assert torch.load(p, weights_only=True)["meta"]["steps"] == 3


def test_read_entropy(tmp_path):
    f = tmp_path / "metrics.csv"
    f.write_text("step,train/loss,train/teacher_entropy\n5,4.1,2.5\n10,4.0,\n15,3.9,2.9\n")
    assert read_entropy(f) == [(5, 2.5), (15, 2.9)]
    assert read_entropy(tmp_path / "none.csv") == []
