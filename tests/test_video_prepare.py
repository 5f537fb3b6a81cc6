"""wtours prepare: H.264 proxy with a fixed GOP, readable, original untouched, bad input."""

import hashlib

import numpy as np
import pytest

from conftest import read_barcode
from wtours.cli import main
from wtours.video import open_video
from wtours.video.index import index_video
from wtours.video.prepare import default_output, prepare_video


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_prepare_makes_a_frame_accurate_proxy(test_videos, tmp_path, capsys):
    src = test_videos("hevc")  # 160x96, 90 frames, HEVC open GOP
    before = _sha(src)
    out = tmp_path / "proxy.mp4"
    assert main(["prepare", str(src), "--short-side", "48", "--out", str(out), "--gop", "10", "--quiet"]) == 0
    assert str(out) in capsys.readouterr().out
    assert _sha(src) == before
    idx = index_video(out)
    assert (idx.codec, idx.width, idx.height, idx.num_frames) == ("h264", 80, 48, 90)
    assert idx.keyframes.tolist() == list(range(0, 90, 10))
    assert idx.fps == pytest.approx(30)
    vf = open_video(out)
    sel = [89, 0, 45, 12]
    assert [read_barcode(f) for f in vf.get_frames(sel).numpy()] == sel
    assert not list(tmp_path.glob(".proxy.mp4.*.tmp"))  # no temp file left behind


def test_default_gop_is_one_second_and_fps_resampling(test_videos, tmp_path):
    src = test_videos("long30")  # 600 frames at 30 fps
    out = prepare_video(src, short_side=24, out=tmp_path / "p.mkv", fps=10, progress=False)
    idx = index_video(out)
    assert idx.num_frames == 200 and idx.fps == pytest.approx(10)
    assert np.all(np.diff(idx.keyframes) == 10)  # one keyframe per second at the new rate
    got = [read_barcode(f) for f in open_video(out).get_frames([0, 1, 100, 199]).numpy()]
    assert got == [0, 3, 300, 597]
    assert default_output(src, 480).name == "long30_480p.mp4"


@pytest.mark.parametrize("case", ["missing", "self", "bad_ext", "bad_gop", "fps_up"])
def test_prepare_bad_input_exits_2_with_one_line(case, test_videos, tmp_path, capsys):
    src = test_videos("h264")
    args = {
        "missing": ["prepare", str(tmp_path / "none.mp4")],
        "self": ["prepare", str(src), "--out", str(src)],
        "bad_ext": ["prepare", str(src), "--out", str(tmp_path / "x.gif")],
        "bad_gop": ["prepare", str(src), "--gop", "0", "--out", str(tmp_path / "y.mp4")],
        "fps_up": ["prepare", str(src), "--fps", "1e9", "--out", str(tmp_path / "z.mp4")],  # used to run for ever
    }[case]
    before = _sha(src)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "error:" in err
    if case == "self":
        assert "overwrite the input" in err and _sha(src) == before
    if case == "missing":
        assert "none.mp4" in err
    if case == "fps_up":
        assert "--fps 1e+09 is above the video's 30.000 fps" in err and not (tmp_path / "z.mp4").exists()


def test_prepare_writes_rotated_footage_upright(tmp_path, capsys):
    import av

    from conftest import write_barcode_video

    # portrait phone clip: stored 160x96 with "turn 90 degrees clockwise" (display matrix -90)
    src = write_barcode_video(tmp_path / "phone.mp4", "libx264", 20, 160, 96, display_rotation=(-90, False, False),
                              options={"preset": "ultrafast"})
    out = tmp_path / "proxy.mp4"
    assert main(["prepare", str(src), "--short-side", "48", "--out", str(out), "--quiet"]) == 0
    assert "48x80 h264" in capsys.readouterr().out
    with av.open(str(out)) as c:  # what any player / decoder sees: upright pixels, no display matrix
        raw = [f for f in c.decode(c.streams.video[0])]
        assert all(f.rotation == 0 and not any("DISPLAYMATRIX" in str(sd.type) for sd in f.side_data.keys())
                   for f in raw)
        pix = [f.to_ndarray(format="rgb24") for f in raw]
    assert len(pix) == 20 and pix[0].shape == (80, 48, 3)
    assert [read_barcode(np.rot90(p, 1)) for p in pix] == list(range(20))  # clockwise-turned barcodes
    assert pix[1][:8, -8:].mean() > 125 and pix[1][:8, :8].mean() < 125  # bit 0 now at the top right
    idx = index_video(out)
    assert (idx.width, idx.height, idx.orientation) == (48, 80, "")


def test_proxy_transcode_gives_the_same_bytes_for_the_same_source(tmp_path):
    """Issue 20 #3: x264 with mbtree gave 8 distinct files in 9 calls on one textured source; the proxy's
    bytes must be a function of the source and the settings."""
    from wtours.video.synth import synthesize

    src = synthesize(tmp_path / "tour", width=320, height=180, fps=15.0, seconds=6.0, sequences=0,
                     progress=False).video
    outs = [prepare_video(src, short_side=90, out=tmp_path / f"proxy{i}.mp4", progress=False) for i in range(3)]
    shas = [_sha(p) for p in outs]
    assert shas[0] == shas[1] == shas[2], shas
