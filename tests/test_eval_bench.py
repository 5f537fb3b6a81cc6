"""``wtours bench eval``: the DAVIS-sized synthetic set and the report (smallest size, CPU)."""

import json

from wtours.bench.eval import make_davis_sized
from wtours.cli import main
from wtours.eval.datasets import read_davis


def test_davis_sized_set_is_written_once_and_readable(tmp_path):
    root, seconds = make_davis_sized(tmp_path / "d", sequences=2, frames=3, height=48, width=64, workers=1)
    assert seconds > 0
    ds = read_davis(root, frames_per_clip=0)
    assert [s.name for s in ds.sequences] == ["bench-000", "bench-001"] and ds.n_frames == 6
    _, again = make_davis_sized(tmp_path / "d", sequences=2, frames=3, height=48, width=64, workers=1)
    assert again == 0.0  # reused
    assert not [p for p in (tmp_path).iterdir() if p.name.startswith(".")]  # no temp folder left


def test_bench_eval_reports_speed_and_scores(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "eval", "--sequences", "1", "--frames", "2", "--arch", "vit_tiny_patch16_224",
               "--device", "cpu", "--data", str(tmp_path / "data"), "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "frames/s" in printed and "clustering+matching total" in printed
    r = json.loads(out.read_text())
    assert r["frames"] == 2 and r["features_frames_per_s"] > 0
    assert set(r["clustering_s"]) >= {"F", "C", "D"}
    assert all(0 <= r["scores"][k] <= 100 for k in ("F", "C", "D"))
