"""wtours.video.decode: frame-accurate random access per codec, resizing, decord checks, bad input."""

import subprocess
import sys

import av
import numpy as np
import pytest
import torch

from conftest import read_barcode, write_barcode_video
from wtours.errors import UserError, VideoError
from wtours.video import open_video
from wtours.video.decode import clip_size, decode_cost, make_geometry, read_all_frames
from wtours.video.index import index_video

CODECS = ["h264", "h264_mkv", "hevc", "vp9", "av1"]


@pytest.fixture(scope="module")
def reference(test_videos):
    """name -> (path, [every frame of a plain sequential PyAV decode])."""
    cache = {}

    def get(name):
        if name not in cache:
            p = test_videos(name)
            cache[name] = (p, list(read_all_frames(p)))
        return cache[name]

    return get


@pytest.mark.parametrize("name", CODECS)
def test_random_access_equals_sequential_decode(name, reference):
    path, ref = reference(name)
    # the encoder really wrote frame i as barcode i, and the index agrees with the decode
    assert [read_barcode(f) for f in ref] == list(range(len(ref)))
    vf = open_video(path)
    assert len(vf) == len(ref) == index_video(path).num_frames
    rng = np.random.default_rng(1)
    sel = np.concatenate([rng.integers(0, len(ref), 20), [len(ref) - 1, 0, 5, 5]])
    got = vf.get_frames(sel)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (sel.size, vf.height, vf.width, 3)
    for g, s in zip(got.numpy(), sel):
        assert np.array_equal(g, ref[s]), f"{name}: frame {s} differs from the sequential decode"
    assert [read_barcode(g) for g in got.numpy()] == sel.tolist()
    # decoding forward never costs more than restarting at each frame's keyframe
    assert vf.stats["decoded_frames"] <= decode_cost(vf.index, np.unique(sel)) + 8
    assert vf.stats["corrupt_packets"] == 0 and vf.stats["missing_frames"] == 0


def test_keyframes_and_b_frames_are_indexed(test_videos):
    idx = index_video(test_videos("h264"))
    assert idx.keyframes.tolist() == [0, 13, 17, 50, 90, 97]  # forced + keyint=40 from frame 50
    assert idx.has_b_frames
    hevc = index_video(test_videos("hevc"))
    assert hevc.keyframes.tolist() == [0, 30, 60] and hevc.has_b_frames and hevc.codec == "hevc"
    assert index_video(test_videos("av1")).codec == "av1"


@pytest.mark.parametrize("name", ["h264", "hevc"])
def test_short_side_resizes_in_the_scaler(name, reference):
    path, _ = reference(name)
    vf = open_video(path)
    sel = [70, 3, 44]
    got = vf.get_frames(sel, short_side=48)
    assert tuple(got.shape) == (3, 48, 80, 3)  # 160x96 -> 80x48
    ref = list(read_all_frames(path, short_side=48))
    for g, s in zip(got.numpy(), sel):
        assert np.array_equal(g, ref[s])
        assert read_barcode(g) == s
    # fixed output for clips: cover + centre crop
    crop = vf.get_frames([10], short_side=32, aspect=16 / 9)
    assert tuple(crop.shape) == (1, 32, 56, 3) and read_barcode(crop[0].numpy()) == 10


def test_geometry():
    assert clip_size(256, 16 / 9) == (256, 456)
    assert clip_size(255, 1.0) == (256, 256)
    assert clip_size(256, 9 / 16) == (456, 256)
    g = make_geometry(3840, 2160, 256, 16 / 9)
    assert (g.out_h, g.out_w) == (256, 456) and g.scale_w >= 456 and g.scale_h >= 256
    g = make_geometry(640, 480, 256, 16 / 9)  # 4:3 source: crop rows, not columns
    assert (g.out_h, g.out_w, g.scale_w) == (256, 456, 456) and g.crop_y > 0 and g.crop_x == 0
    g = make_geometry(1080, 1920, 100)  # portrait keeps its aspect
    assert (g.out_w, g.out_h) == (100, 178)


def test_bigbuckbunny_is_frame_accurate(bigbuckbunny):
    ref = list(read_all_frames(bigbuckbunny, short_side=90))
    vf = open_video(bigbuckbunny)
    assert (len(vf), vf.width, vf.height, round(vf.fps)) == (len(ref), 1280, 720, 25)
    assert abs(vf.duration - len(ref) / 25) < 1e-6
    sel = np.random.default_rng(0).permutation(len(ref))[:16]
    got = vf.get_frames(sel, short_side=90)
    assert tuple(got.shape) == (16, 90, 160, 3)
    for g, s in zip(got.numpy(), sel):
        assert np.array_equal(g, ref[s])


def test_decord_matches_where_it_is_trusted_and_refuses_the_rest(test_videos):
    pytest.importorskip("decord")
    p = test_videos("h264")
    vf = open_video(p, backend="decord")
    sel = [97, 3, 50, 51, 119]
    assert [read_barcode(f) for f in vf.get_frames(sel).numpy()] == sel
    assert [read_barcode(f) for f in vf.get_frames(sel, short_side=48).numpy()] == sel
    with pytest.raises(VideoError, match="HEVC"):
        open_video(test_videos("hevc"), backend="decord")
    with pytest.raises(VideoError, match="AV1"):
        open_video(test_videos("av1"), backend="decord")


def test_corrupt_packet_is_skipped_counted_and_logged(test_videos, tmp_path, caplog):
    src = test_videos("h264_mkv")
    with av.open(str(src)) as c:
        pk = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    data = bytearray(src.read_bytes())
    pos, size = pk[40]
    data[pos + 4: pos + size] = b"\xff" * (size - 4)
    bad = tmp_path / "corrupt.mkv"
    bad.write_bytes(bytes(data))
    vf = open_video(bad)
    got = vf.get_frames(np.arange(len(vf)), short_side=48)
    assert got.shape[0] == len(vf) == 90
    assert vf.stats["corrupt_packets"] + vf.stats["missing_frames"] >= 1
    assert "corrupt" in caplog.text or "could not be decoded" in caplog.text
    codes = [read_barcode(f) for f in got.numpy()]
    assert sum(c == i for i, c in enumerate(codes)) >= 85  # only the broken frames differ


def test_truncated_tail_keeps_what_can_be_read(test_videos, tmp_path):
    src = test_videos("h264_mkv")
    data = src.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 2 // 3])
    vf = open_video(cut)
    assert 30 < len(vf) < 90
    assert read_barcode(vf.get_frames([10])[0].numpy()) == 10


def _zero_frame_mp4(path):
    with av.open(str(path), "w") as oc:
        s = oc.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
        oc.start_encoding()
    return path


def test_bad_inputs_raise_one_line_errors(test_videos, tmp_path):
    good = test_videos("h264")
    notvideo = tmp_path / "notes.mp4"
    notvideo.write_text("hello, I am not a video\n" * 50)
    header_only = tmp_path / "half.mp4"
    header_only.write_bytes(good.read_bytes()[:2000])  # moov is at the end: unreadable
    cases = {
        tmp_path / "missing.mp4": "no such file",
        tmp_path: "directory",
        notvideo: "cannot open",
        header_only: "",
        _zero_frame_mp4(tmp_path / "empty.mp4"): "",
    }
    for path, words in cases.items():
        with pytest.raises(VideoError) as e:
            open_video(path)
        msg = str(e.value)
        assert str(path) in msg and "\n" not in msg and words in msg
    vf = open_video(good)
    with pytest.raises(VideoError, match="out of range"):
        vf.get_frames([0, 120])
    with pytest.raises(VideoError, match="out of range"):
        vf.get_frames([-1])
    with pytest.raises(UserError, match="unknown video backend"):
        open_video(good, backend="opencv")


def test_video_file_is_picklable_and_reopens(test_videos):
    import pickle

    vf = open_video(test_videos("vp9"))
    vf.get_frames([5])
    vf2 = pickle.loads(pickle.dumps(vf))
    assert read_barcode(vf2.get_frames([77])[0].numpy()) == 77


def test_changed_file_is_detected(test_videos, tmp_path):
    p = write_barcode_video(tmp_path / "v.mp4", "libx264", 20, 64, 36, options={"preset": "ultrafast"})
    vf = open_video(p)
    write_barcode_video(p, "libx264", 30, 64, 36, options={"preset": "ultrafast"})
    with pytest.raises(VideoError, match="changed"):
        vf.get_frames([1])
    assert len(open_video(p)) == 30


def test_cli_bad_video_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "wtours.cli", "index", str(tmp_path / "nope.mkv")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "nope.mkv" in r.stderr


# -- rotated footage (display matrix) ---------------------------------------------------------------

ROTATIONS = [(90, False, False), (-90, False, False), (180, False, False), (90, True, False), (0, False, True)]


def displayed(raw: np.ndarray, deg: int, hflip: bool, vflip: bool) -> np.ndarray:
    """What a player shows (PyAV's ``set_display_rotation`` semantics: turn ``deg`` counter-clockwise,
    then mirror)."""
    out = np.rot90(raw, deg // 90)
    if hflip:
        out = out[:, ::-1]
    if vflip:
        out = out[::-1]
    return np.ascontiguousarray(out)


def raw_frames(path):
    """Every decoded frame as stored (no orientation applied), and whether the file carries a
    display matrix (what ``ffprobe`` shows as side data)."""
    with av.open(str(path)) as c:
        frames = list(c.decode(c.streams.video[0]))
        has_matrix = all(any("DISPLAYMATRIX" in str(sd.type) for sd in f.side_data.keys()) for f in frames)
        return [f.to_ndarray(format="rgb24") for f in frames], has_matrix, frames[0].rotation


@pytest.mark.parametrize("rot", ROTATIONS, ids=lambda r: f"{r[0]}{'h' if r[1] else ''}{'v' if r[2] else ''}")
def test_rotated_video_is_decoded_upright(rot, tmp_path):
    deg, hflip, vflip = rot
    p = write_barcode_video(tmp_path / "phone.mp4", "libx264", 12, 160, 96, display_rotation=rot,
                            options={"preset": "ultrafast"})
    raw, has_matrix, rotation = raw_frames(p)
    assert has_matrix and raw[0].shape == (96, 160, 3)  # stored sideways, with a display matrix ...
    assert rotation % 360 == deg % 360
    want = [displayed(f, deg, hflip, vflip) for f in raw]  # ... shown turned
    vf = open_video(p)
    dh, dw = want[0].shape[:2]
    assert (vf.width, vf.height) == (dw, dh)
    s = index_video(p).summary()
    assert (s["width"], s["height"], s["coded_width"], s["coded_height"]) == (dw, dh, 160, 96)
    sel = [11, 0, 5, 5]
    got = vf.get_frames(sel).numpy()
    assert got.shape == (4, dh, dw, 3)
    for g, i in zip(got, sel):
        assert np.array_equal(g, want[i]), f"frame {i} is not shown as a player shows it"
    # resized: short side 48 of the displayed frame; the sequential reference agrees
    small = vf.get_frames([3], short_side=48).numpy()[0]
    assert small.shape == ((80, 48, 3) if deg % 180 else (48, 80, 3))
    assert np.array_equal(small, list(read_all_frames(p, short_side=48))[3])
    assert np.array_equal(list(read_all_frames(p))[7], want[7])


def test_portrait_phone_video_comes_out_upright(tmp_path):
    # a phone's portrait clip: stored 160x96 landscape, "turn 90 degrees clockwise" (display matrix -90)
    p = write_barcode_video(tmp_path / "portrait.mp4", "libx264", 8, 160, 96, display_rotation=(-90, False, False),
                            options={"preset": "ultrafast"})
    vf = open_video(p)
    assert (vf.width, vf.height, len(vf)) == (96, 160, 8)
    g = vf.get_frames([1]).numpy()[0]  # frame 1: only the stored top-left block is bright
    assert g.shape == (160, 96, 3)
    assert g[:10, -10:].mean() > 125  # turned clockwise: the stored top-left corner is now the top right
    assert g[:10, :10].mean() < 125 and g[-10:, :10].mean() < 125
    assert [read_barcode(np.rot90(f, 1)) for f in vf.get_frames([6, 2]).numpy()] == [6, 2]


def test_decord_refuses_rotated_videos(tmp_path):
    pytest.importorskip("decord")
    p = write_barcode_video(tmp_path / "r.mp4", "libx264", 8, 160, 96, display_rotation=(90, False, False),
                            options={"preset": "ultrafast"})
    with pytest.raises(VideoError, match="decord backend mishandles rotated videos") as e:
        open_video(p, backend="decord")
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_orientation_from_display_matrix():
    from wtours.video.index import orientation_from_matrix

    one = 1 << 16
    m = lambda a, b, c, d: (a * one, b * one, 0, c * one, d * one, 0, 0, 0, 1 << 30)  # noqa: E731
    assert orientation_from_matrix(None) == "" and orientation_from_matrix(m(1, 0, 0, 1)) == ""
    assert orientation_from_matrix(m(0, -1, 1, 0)) == "cclock"  # rotation 90 (counter-clockwise)
    assert orientation_from_matrix(m(0, 1, -1, 0)) == "clock"  # rotation -90: portrait phone footage
    assert orientation_from_matrix(m(-1, 0, 0, -1)) == "rotate180"
    assert orientation_from_matrix(m(-1, 0, 0, 1)) == "hflip"
    assert orientation_from_matrix(m(1, 0, 0, -1)) == "vflip"
    assert orientation_from_matrix(m(0, 1, 1, 0)) == "cclock_flip"
    assert orientation_from_matrix(m(0, -1, -1, 0)) == "clock_flip"
    with pytest.raises(ValueError, match="turns the picture 45 degrees clockwise"):
        orientation_from_matrix((46341, 46341, 0, -46341, 46341, 0, 0, 0, 1 << 30))
