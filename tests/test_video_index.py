"""wtours.video.index: packet index, compact cache (reuse + invalidation), the `wtours index` CLI."""

import json
import os
import time

import numpy as np
import pytest

import wtours.video.index as vi
from conftest import write_barcode_video
from wtours.cli import main
from wtours.errors import VideoError
from wtours.video.index import VideoIndex, _pack_int64, _unpack_int64, index_video


def _video(tmp_path, n=30, name="v.mp4"):
    return write_barcode_video(tmp_path / name, "libx264", n, 64, 36, fps=30,
                               options={"preset": "ultrafast", "x264-params": "keyint=10:min-keyint=10:scenecut=0"})


def test_index_fields(tmp_path):
    p = _video(tmp_path)
    idx = index_video(p)
    assert (idx.num_frames, idx.width, idx.height, idx.codec) == (30, 64, 36, "h264")
    assert idx.fps == pytest.approx(30) and idx.duration == pytest.approx(1.0)
    assert idx.keyframes.tolist() == [0, 10, 20]
    assert np.all(np.diff(idx.pts) > 0) and idx.pts.size == 30
    assert idx.size_bytes == p.stat().st_size and idx.path == str(p.resolve())
    assert idx.keyframe_at_or_before(19) == 10 and idx.frame_of_pts(int(idx.pts[7])) == 7
    assert idx.frame_of_pts(int(idx.pts[7]) + 1) == -1


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    p = _video(tmp_path)
    first = index_video(p)
    cache = vi.cache_path_of(p)
    assert cache is not None and cache.exists()
    assert str(cache).startswith(os.environ["WTOURS_CACHE"])  # the env var wins

    def boom(path):
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setattr(vi, "build_index", boom)
    again = index_video(p)
    assert np.array_equal(again.pts, first.pts) and again.keyframes.tolist() == first.keyframes.tolist()
    with pytest.raises(AssertionError):
        index_video(p, rebuild=True)
    monkeypatch.undo()
    time.sleep(0.01)
    _video(tmp_path, n=40)  # the file changes: size and mtime differ
    assert index_video(p).num_frames == 40


def test_cache_beside_the_video_without_env(tmp_path, monkeypatch):
    monkeypatch.delenv("WTOURS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    p = _video(tmp_path)
    index_video(p)
    side = tmp_path / ".v.mp4.wtours-index.json"
    assert side.exists()
    d = json.loads(side.read_text())
    assert d["num_frames"] == 30 and d["format"] == "wtours-video-index"
    assert VideoIndex.from_json(d).num_frames == 30


def test_pts_are_stored_compactly():
    pts = np.arange(432_000, dtype=np.int64) * 256 + 1000  # 2 h at 60 fps
    packed = _pack_int64(pts)
    assert len(json.dumps(packed)) < 10_000
    assert np.array_equal(_unpack_int64(packed), pts)
    vfr = np.cumsum(np.random.default_rng(0).integers(1, 5, 1000))
    assert np.array_equal(_unpack_int64(_pack_int64(vfr)), vfr)


def test_cli_index_text_and_json(tmp_path, capsys):
    p = _video(tmp_path)
    assert main(["index", str(p)]) == 0
    out = capsys.readouterr().out
    for word in ("h264", "64x36", "30.000 fps", "30 frames", "3 keyframes", "mean spacing 10.0"):
        assert word in out
    assert main(["index", str(p), "--json", "--rebuild"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["num_frames"] == 30 and d["keyframes"] == 3 and d["mean_keyframe_spacing"] == 10.0
    q = _video(tmp_path, n=20, name="w.mp4")
    assert main(["index", str(p), str(q), "--json"]) == 0
    assert [x["num_frames"] for x in json.loads(capsys.readouterr().out)] == [30, 20]


@pytest.mark.parametrize("kind", ["missing", "directory", "text", "empty"])
def test_cli_index_bad_input(kind, tmp_path, capsys):
    target = {"missing": tmp_path / "no.mp4", "directory": tmp_path, "text": tmp_path / "a.mkv",
              "empty": tmp_path / "zero.mp4"}[kind]
    if kind == "text":
        target.write_text("not a video")
    if kind == "empty":
        target.write_bytes(b"")
    assert main(["index", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(target) in err and "Traceback" not in err


def test_build_index_reports_no_video_stream(tmp_path):
    import wave

    p = tmp_path / "audio.wav"
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 8000)
    with pytest.raises(VideoError, match="no video stream"):
        index_video(p)


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_non_regular_files_are_named_not_read(kind, tmp_path, capsys):
    if kind == "fifo":
        target = tmp_path / "pipe.mp4"
        os.mkfifo(target)  # nobody writes: opening it for reading would block
        words = "not a regular file (a FIFO)"
    else:
        target = "/dev/zero"
        words = "not a regular file (a character device)"
    for cmd in (["index", str(target)], ["prepare", str(target), "--out", str(tmp_path / "o.mp4")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(target) in err and words in err and "empty" not in err
    with pytest.raises(VideoError, match="a FIFO" if kind == "fifo" else "a character device"):
        index_video(target)


def test_index_reports_the_displayed_size_of_rotated_video(tmp_path, capsys):
    p = write_barcode_video(tmp_path / "phone.mp4", "libx264", 6, 64, 36, display_rotation=(-90, False, False),
                            options={"preset": "ultrafast"})
    assert main(["index", str(p), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["width"], d["height"], d["coded_width"], d["coded_height"]) == (36, 64, 64, 36)
    assert d["orientation"] == "clock"
    assert main(["index", str(p)]) == 0
    out = capsys.readouterr().out
    assert "36x64" in out and "coded 64x36" in out


def test_old_cache_without_orientation_is_rebuilt(tmp_path):
    p = write_barcode_video(tmp_path / "phone.mp4", "libx264", 6, 64, 36, display_rotation=(90, False, False),
                            options={"preset": "ultrafast"})
    idx = index_video(p)
    cache = vi.cache_path_of(p)
    d = json.loads(cache.read_text())
    d.update(version=1, width=64, height=36)  # an index written before orientation was known
    for k in ("orientation", "coded_width", "coded_height"):
        d.pop(k)
    cache.write_text(json.dumps(d))
    assert (index_video(p).width, index_video(p).orientation) == (36, "cclock") == (idx.width, idx.orientation)


def test_rotation_that_is_not_a_right_angle_is_refused(tmp_path, capsys):
    p = write_barcode_video(tmp_path / "tilted.mp4", "libx264", 4, 64, 36, display_rotation=(45, False, False),
                            options={"preset": "ultrafast"})
    assert main(["index", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(p) in err and "turns the picture 315 degrees clockwise; only multiples of 90" in err


def test_a_truncated_file_is_indexed_with_a_warning_and_its_proxy_too(tmp_path, caplog):
    """Issue 20 #7: truncated inputs were indexed / transcoded shorter with no warning (a 1-frame proxy of a
    90-frame file)."""
    import logging

    from conftest import write_barcode_video
    from wtours.video.prepare import prepare_video

    full = write_barcode_video(tmp_path / "full.mkv", "libx264", 90, width=160, height=96, fps=15,
                               options={"x264-params": "keyint=30:min-keyint=30:scenecut=0"})
    data = full.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 3])
    with caplog.at_level(logging.WARNING, logger="wtours"):
        assert not index_video(full).truncated
        assert not caplog.records
        idx = index_video(cut)
    assert idx.truncated and idx.declared_frames == 90 and idx.num_frames < 60
    (rec,) = caplog.records
    assert rec.getMessage() == (f"{cut}: the file declares 90 frames but only {idx.num_frames} could be read "
                                f"({idx.duration:.1f} of 6.0 s): it looks truncated; using the {idx.num_frames} "
                                "readable frames")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wtours"):
        index_video(cut)  # cached: said once
        assert not caplog.records
        prepare_video(cut, short_side=48, out=tmp_path / "proxy.mp4", progress=False)
    assert f"{cut}: making a proxy of a truncated file: {idx.num_frames} frames of the 90 its header declares" in [
        r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("kind", ["loop", "broken"])
def test_symbolic_link_loops_and_broken_links_are_named_as_such(tmp_path, capsys, kind):
    """Issue 20 #7: a symlink loop was reported as "no such file"."""
    from wtours.cli import main

    link = tmp_path / "a.mp4"
    if kind == "loop":
        link.symlink_to(tmp_path / "b.mp4")
        (tmp_path / "b.mp4").symlink_to(link)
        want = f"{link}: symbolic link loop (too many levels of symbolic links)"
    else:
        link.symlink_to(tmp_path / "gone.mp4")
        want = f"{link}: broken symbolic link (its target {tmp_path / 'gone.mp4'} does not exist)"
    assert main(["index", str(link)]) == 2
    assert capsys.readouterr().err.strip() == f"wtours index: error: {want}"
    assert main(["pretrain", "--config", "video/tiny", "--video", str(link), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"wtours pretrain: error: {want}"
