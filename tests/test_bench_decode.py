"""wtours bench decode: table + JSON per backend, the synthetic 4K clip generator, bad input."""

import json

import numpy as np
import pytest

from wtours.bench.decode import format_table, run_bench, synth_4k_clip
from wtours.cli import main
from wtours.video import open_video
from wtours.video.index import index_video


def test_synthetic_clip_is_textured_and_moving(tmp_path):
    p = synth_4k_clip(tmp_path / "s.mp4", seconds=0.5, fps=30, width=320, height=180, gop=5)
    idx = index_video(p)
    assert (idx.width, idx.height, idx.num_frames, idx.codec) == (320, 180, 15, "h264")
    assert idx.keyframes.tolist() == [0, 5, 10]
    f = open_video(p).get_frames([0, 14]).numpy().astype(float)
    assert f[0].std() > 20  # texture, not a flat colour
    assert np.abs(f[0] - f[1]).mean() > 5  # it moves


def test_run_bench_reports_each_backend(test_videos):
    res = run_bench(str(test_videos("long30")), short_side=24, backends=("pyav", "decord"), clips=30,
                    workers=0)
    assert res["ceiling_fps"] > 0 and res["stride"] == 30  # 600 frames: stride halved to fit two blocks
    rows = {r["backend"]: r for r in res["backends"]}
    py = rows["pyav"]
    assert py["delivered_frames"] == 30 * 8 and py["decoded_per_delivered"] <= 1.5
    assert py["vs_ceiling"] > 0 and py["peak_rss_mib"] > 10 and py["clip_shape"] == [8, 3, 24, 42]
    assert "delivered_fps" in rows["decord"] or "error" in rows["decord"]
    table = format_table(res)
    assert "pyav" in table and "ceiling" in table


def test_cli_writes_json_and_refuses_bad_input(test_videos, tmp_path, capsys):
    out = tmp_path / "b.json"
    v = str(test_videos("long30"))
    assert main(["bench", "decode", v, "--short-side", "24", "--backends", "pyav", "--clips", "4",
                 "--workers", "0", "--stride", "20", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["stride"] == 20 and d["backends"][0]["delivered_frames"] == 32
    assert "delivered/s" in capsys.readouterr().out
    for args in (["bench", "decode", str(tmp_path / "nope.mp4")],
                 ["bench", "decode", v, "--backends", "opencv"],
                 ["bench", "decode", v, "--clips", "0"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
