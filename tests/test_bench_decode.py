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


def test_looped_tour_decodes_every_frame(tmp_path):
    from wtours.bench.decode import loop_video

    pat = synth_4k_clip(tmp_path / "p.mp4", seconds=0.5, fps=30, width=160, height=96, gop=15)
    out = loop_video(pat, tmp_path / "loop.mp4", 2.0)
    idx = index_video(out)
    assert (idx.num_frames, idx.keyframes.tolist()) == (60, list(range(0, 60, 15)))
    f = open_video(out)
    assert np.array_equal(f.get_frames([3]).numpy(), f.get_frames([33]).numpy())  # the pattern, repeated
    assert f.get_frames(list(range(60))).shape[0] == 60  # every frame decodes (the old copy kept no payloads)


def test_run_bench_reports_each_backend(test_videos):
    res = run_bench(str(test_videos("long30")), short_side=24, backends=("pyav", "decord"), clips=None,
                    workers=0, gpu=None)  # default: the steady state
    assert res["ceiling_fps"] > 0 and res["stride"] == 30  # 1 s at 30 fps
    rows = {r["backend"]: r for r in res["backends"]}
    py = rows["pyav"]
    assert py["delivered_frames"] == py["clips"] * 8 >= 64 * 16 * 8 and py["decoded_per_delivered"] <= 1.5
    assert py["vs_ceiling"] > 0 and py["peak_rss_mib"] > 10 and py["clip_shape"] == [8, 3, 24, 42]
    assert py["windows_in_video"] == 600 // 240 and 1 <= py["windows_per_batch"] <= py["windows_in_video"]
    assert "delivered_fps" in rows["decord"] or "error" in rows["decord"]
    table = format_table(res)
    assert "pyav" in table and "ceiling" in table and "windows/batch" in table


def test_default_clips_measure_the_steady_state(test_videos):
    """The old default (24 clips, less than one decode task per worker) measured start-up, not the steady state."""
    from wtours.bench.decode import steady_clips
    from wtours.video.clips import ClipDataset

    ds = ClipDataset([str(test_videos("long30"))], frames_per_clip=8, stride=30, short_side=24, batch_size=16)
    n = steady_clips(ds, 16)
    assert n % 16 == 0 and n >= 64 * 16


def test_cli_writes_json_and_refuses_bad_input(test_videos, tmp_path, capsys):
    out = tmp_path / "b.json"
    v = str(test_videos("long30"))
    assert main(["bench", "decode", v, "--short-side", "24", "--backends", "pyav", "--clips", "4",
                 "--workers", "0", "--stride", "20", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["stride"] == 20 and d["backends"][0]["delivered_frames"] == 16 * 8  # at least one batch of 16
    # the GPU's appetite: ViT-S/16 DoRA step ~124-133 GFLOP per frame -> ~2,000-2,500 frames/s on an H100 at 30 %
    assert 100 < d["gflop_per_frame"] < 160 and 1500 < d["gpu_frames_per_s"] < 3000
    assert "vs_gpu" in d["backends"][0]
    assert "delivered/s" in capsys.readouterr().out
    for args in (["bench", "decode", str(tmp_path / "nope.mp4")],
                 ["bench", "decode", v, "--backends", "opencv"],
                 ["bench", "decode", v, "--clips", "0"],
                 ["bench", "decode", v, "--mfu", "2"],
                 ["bench", "decode", "--gop", "0"],
                 ["bench", "decode", "--seconds", "0"],
                 ["bench", "decode", v, "--lanes", "0"],
                 ["bench", "decode", v, "--repeat", "0"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err


def test_planned_diversity_of_a_long_tour(test_videos):
    """The 2-hour plan column: >= 14 distinct 8-s windows per batch of 16 (the old loader: ~3)."""
    from wtours.bench.decode import planned_windows

    p = planned_windows(str(test_videos("long30")), stride=30, seconds=1800)  # 30 min at 30 fps, GOP 30
    assert p["planned_batches"] == 1800 * 30 // 16
    assert p["planned_windows_per_batch"] >= 14
    one_lane = planned_windows(str(test_videos("long30")), stride=30, seconds=1800, lanes=1)
    assert one_lane["planned_windows_per_batch"] < 4  # the column can tell a loader without lanes


def test_soak_samples_memory_and_reports_a_slope(test_videos, tmp_path, capsys):
    """Issue 20: `bench decode --soak MINUTES` (shortened here: 6 s, a sample every 2 s) runs the loader epoch
    after epoch and reports the PSS slope from samples taken at a fixed interval."""
    out = tmp_path / "soak.json"
    v = str(test_videos("long30"))
    assert main(["bench", "decode", v, "--soak", "0.1", "--soak-every", "2", "--short-side", "24",
                 "--backends", "pyav", "--workers", "1", "--stride", "20", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["backend"] == "pyav" and d["workers"] == 1 and 0.09 <= d["minutes"] < 0.5
    t = [s["t_s"] for s in d["samples"]]
    assert len(t) >= 4 and t[0] < 1 and t == sorted(t)  # at start, every 2 s, at the end
    assert all(1.5 < b - a < 2.5 for a, b in zip(t[:-2], t[1:-1]))
    assert d["epochs"] >= 1 and d["delivered_frames"] > 0 and d["samples"][-1]["frames"] == d["delivered_frames"]
    assert all(s["pss_mib"] > 0 and s["procs"] >= 1 for s in d["samples"])
    assert d["samples"][-1]["procs"] >= 1 and max(s["worker_rss_mib"] for s in d["samples"]) > 0  # a worker ran
    assert isinstance(d["pss_slope_mib_per_h"], float) and isinstance(d["pss_slope_all_mib_per_h"], float)
    printed = capsys.readouterr().out
    assert "MiB/h" in printed and "PSS" in printed


def test_slope_per_hour_is_a_least_squares_line():
    from wtours.bench.soak import slope_per_hour

    assert slope_per_hour([0, 60, 120, 180], [100, 101, 102, 103]) == pytest.approx(60.0)
    assert slope_per_hour([0, 60, 120], [100, 90, 110]) == pytest.approx(300.0)
    assert slope_per_hour([5], [1]) is None


@pytest.mark.parametrize("argv, needle", [
    (["--soak", "0"], "--soak must be > 0 minutes, got 0"),
    (["--soak", "1", "--soak-every", "0"], "--soak-every must be > 0 seconds, got 0"),
    (["--soak", "0.01", "--soak-every", "60"], "--soak-every 60 s is longer than the soak (0.01 min)"),
])
def test_soak_options_are_checked_before_the_work(argv, needle, capsys):
    assert main(["bench", "decode", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err
