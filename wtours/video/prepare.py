"""``wtours prepare``: one-time transcode of a (4K) video to a training proxy; the automatic proxy of ``wtours pretrain``.

The proxy is H.264 (libx264, ``yuv420p``) at a smaller short side with a keyframe every ``gop``
frames (default: one per second; scene-cut keyframes off, so the spacing is exact). Decoding it is
~(original pixels / proxy pixels) times cheaper, and a short GOP bounds the cost of every seek
(see the cost model in :mod:`wtours.video.clips`). The frames are resized in the decoder's scaler,
never as full-resolution RGB. Audio is dropped. The output is written to a temporary file and
renamed when complete; the input is never modified and cannot be the output.

The bytes are reproducible: the same source and settings give the same file on the same machine (x264's
macroblock-tree rate control is off, ``mbtree=0``: with it the output varied from call to call, 8
distinct files in 9 calls measured on one source, and so did every weight trained on it). Other
machines (another libx264 / FFmpeg build, other CPU instruction sets) may encode other bytes.

Rotated input (phone footage with a display matrix) is written upright: the frames are scaled in
their coded orientation, turned (via RGB) and encoded at the displayed size, and the proxy carries
no display matrix, so every decoder reads it the right way up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from fractions import Fraction
from pathlib import Path

from wtours.errors import UserError, VideoError
from wtours.fsutil import atomic_open
from wtours.video.decode import make_geometry
from wtours.video.index import (
    _ff_reason,
    check_video_path,
    coded_size,
    first_video_stream,
    index_video,
    open_container,
    orient,
)

log = logging.getLogger(__name__)

_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}


def default_output(video: str | Path, short_side: int) -> Path:
    v = Path(video)
    return v.with_name(f"{v.stem}_{short_side}p.mp4")


def prepare_video(video: str | Path, short_side: int = 480, out: str | Path | None = None, gop: int | None = None,
                  crf: int = 20, preset: str = "veryfast", fps: float | None = None,
                  progress: bool = True) -> Path:
    """Transcode ``video`` to an H.264 proxy; returns the output path (see the module docstring)."""
    import av
    import numpy as np
    from tqdm import tqdm

    src = check_video_path(video)
    out = default_output(src, short_side) if out is None else Path(out).expanduser()
    if short_side < 2:
        raise UserError(f"--short-side must be >= 2, got {short_side}")
    if gop is not None and gop < 1:
        raise UserError(f"--gop must be >= 1, got {gop}")
    if not 0 <= crf <= 51:
        raise UserError(f"--crf must be in 0..51, got {crf}")
    if fps is not None and not fps > 0:
        raise UserError(f"--fps must be > 0, got {fps}")
    if out.exists() and out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src)):
        raise UserError("refusing to overwrite the input video; choose another --out", path=out)
    if out.is_dir():
        raise UserError("--out is a directory; give a file name", path=out)
    fmt = _FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UserError(f"unsupported output extension {out.suffix!r} (use .mp4, .mov or .mkv)", path=out)
    if preset not in ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                      "veryslow", "placebo"):
        raise UserError(f"unknown x264 preset {preset!r}")

    idx = index_video(src)
    if idx.truncated:
        log.warning("%s: making a proxy of a truncated file: %d frames of the %d its header declares", src,
                    idx.num_frames, idx.declared_frames)
    if fps is not None and fps > idx.fps * 1.01:
        raise UserError(f"--fps {fps:g} is above the video's {idx.fps:.3f} fps: a proxy can only drop frames "
                        "(repeating them adds nothing to train on)", path=src)
    geom = make_geometry(idx.width, idx.height, short_side)
    w, h = geom.scale_w, geom.scale_h
    if min(idx.width, idx.height) <= short_side:
        log.warning("%s: short side %d is not above the video's (%d); keeping its size",
                    src, short_side, min(idx.width, idx.height))
        w, h = idx.width, idx.height
    w, h = max(2, w // 2 * 2), max(2, h // 2 * 2)  # yuv420p needs even sizes
    src_rate = Fraction(idx.fps).limit_denominator(1001)
    rate = Fraction(fps).limit_denominator(1001) if fps else src_rate
    gop = gop or max(1, round(float(rate)))
    total = idx.num_frames if fps is None else max(1, round(idx.duration * float(rate)))

    container = open_container(src)
    try:
        in_stream = first_video_stream(container, src)
        in_stream.thread_type = "AUTO"
        with atomic_open(out, "wb") as fh:
            with av.open(fh, mode="w", format=fmt) as oc:
                os_ = oc.add_stream("libx264", rate=rate)
                os_.width, os_.height, os_.pix_fmt = w, h, "yuv420p"
                os_.codec_context.gop_size = gop
                os_.codec_context.options = {
                    "crf": str(crf), "preset": preset,
                    # mbtree off: with it x264's output varied from call to call on the same input
                    # (8 distinct files in 9 calls, measured); without it the bytes are a function of the
                    # input and the settings (see the module docstring)
                    "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:mbtree=0",
                }
                os_.thread_type = "AUTO"
                bar = tqdm(total=total, unit="frame", desc=f"prepare {src.name}", file=sys.stderr,
                           disable=not progress, dynamic_ncols=True)
                n_out = 0

                turn = idx.orientation
                cw, ch = coded_size(w, h, turn)

                def emit(frame, k):
                    nonlocal n_out
                    if turn:  # upright pixels; the new stream has no display matrix
                        rgb = frame.reformat(width=cw, height=ch, format="rgb24").to_ndarray()
                        nf = av.VideoFrame.from_ndarray(np.ascontiguousarray(orient(rgb, turn)), format="rgb24")
                        nf = nf.reformat(format="yuv420p")
                    else:
                        nf = frame.reformat(width=w, height=h, format="yuv420p")
                    nf.pts = k
                    nf.time_base = Fraction(1) / rate
                    for p in os_.encode(nf):
                        oc.mux(p)
                    n_out += 1
                    bar.update(1)

                t0 = int(idx.pts[0])
                prev = None
                prev_t = 0.0
                k = 0
                try:
                    for fr in container.decode(in_stream):
                        if fps is None:
                            emit(fr, k)
                            k += 1
                            continue
                        ts = fr.pts if fr.pts is not None else t0
                        t = float((ts - t0) * idx.time_base)
                        if prev is not None:
                            while k / float(rate) < (prev_t + t) / 2:  # nearest source frame
                                emit(prev, k)
                                k += 1
                        prev, prev_t = fr, t
                except av.error.FFmpegError as e:
                    if n_out == 0 and prev is None:
                        raise VideoError(f"cannot decode ({_ff_reason(e)})", path=src) from None
                    log.warning("%s: decoding stopped early (%s); the proxy ends there", src, _ff_reason(e))
                if fps is not None and prev is not None:
                    end = prev_t + 1.0 / float(src_rate)
                    while k / float(rate) < end - 1e-9:
                        emit(prev, k)
                        k += 1
                for p in os_.encode():
                    oc.mux(p)
                bar.close()
                if n_out == 0:
                    raise VideoError("no frame could be decoded", path=src)
                if fps is None and n_out < idx.num_frames:
                    log.warning("%s: only %d of its %d indexed frames could be decoded; the proxy ends there",
                                src, n_out, idx.num_frames)
    except av.error.FFmpegError as e:
        raise VideoError(f"transcode failed ({_ff_reason(e)})", path=src) from None
    finally:
        container.close()
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out, 0o666 & ~umask)  # the temp file was private (0600)
    index_video(out, rebuild=True)
    return out


# -- the automatic training proxy (``wtours pretrain``, ``data.proxy: auto``) -------------------------

PROXY_VERSION = 2  # bump when the proxy's encoding changes: old cache entries are then ignored
PROXY_MIN_SCALE = 1.5  # make a proxy when the source's short side is at least this times the training one


def proxy_cache_dir() -> Path:
    """``<wtours cache>/proxy`` (``$WTOURS_CACHE/proxy`` when set, else ``~/.cache/wtours/proxy``)."""
    from wtours.video.index import cache_dir

    return cache_dir().parent / "proxy"


def needs_proxy(video: str | Path, short_side: int) -> bool:
    """True when ``video`` is larger than training at ``short_side`` needs (short side >= 1.5x)."""
    idx = index_video(video)
    return min(idx.width, idx.height) >= PROXY_MIN_SCALE * int(short_side)


def proxy_path(video: str | Path, short_side: int, gop: int | None = None, crf: int = 20,
               preset: str = "veryfast") -> Path:
    """Where the cached proxy of ``video`` lives: keyed by the source's identity (absolute path, size,
    modification time) and the proxy's settings, so a changed source gets a new proxy."""
    import hashlib

    src = Path(video).resolve()
    st = src.stat()
    key = f"{src}|{st.st_size}|{st.st_mtime_ns}|{short_side}|{gop}|{crf}|{preset}|v{PROXY_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return proxy_cache_dir() / f"{src.stem}-{digest}-{short_side}p.mp4"


def ensure_proxy(video: str | Path, short_side: int, *, gop: int | None = None, crf: int = 20,
                 preset: str = "veryfast", progress: bool = True, wait_s: float = 0.5) -> Path:
    """The cached H.264 training proxy of ``video`` at ``short_side`` (:func:`prepare_video`), made once.

    The transcode is atomic (temp file + rename). Processes that ask for the same proxy at once (the
    ranks of a ``torchrun`` job on one node) share one transcode: the first takes a lock file, the
    others wait for the proxy (a lock whose process died is taken over)."""
    out = proxy_path(video, short_side, gop, crf, preset)
    if out.is_file():
        return out
    from wtours.fsutil import ensure_dir

    ensure_dir(out.parent)
    lock = out.with_name(out.name + ".lock")
    while True:
        if out.is_file():
            return out
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _lock_alive(lock):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                continue
            time.sleep(wait_s)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        try:
            if out.is_file():
                return out
            idx = index_video(video)
            if progress:
                print(f"wtours: making a {short_side}p training proxy of {video} ({idx.width}x{idx.height}, "
                      f"{idx.num_frames} frames), once; cached as {out}", file=sys.stderr)
            t0 = time.perf_counter()
            prepare_video(video, short_side, out=out, gop=gop, crf=crf, preset=preset, progress=progress)
            if progress:
                dt = time.perf_counter() - t0
                print(f"wtours: proxy ready in {dt:.0f} s ({idx.num_frames / max(dt, 1e-9):.1f} frames/s)",
                      file=sys.stderr)
            return out
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)


def training_videos(videos, short_side: int, mode: str = "auto", progress: bool = True) -> list[str]:
    """The files the loader decodes for ``videos`` trained at ``short_side``: with ``mode="auto"`` a
    cached proxy (:func:`ensure_proxy`) for every video whose short side is >= 1.5x the training one,
    the video itself otherwise; ``mode="off"``: the videos as given."""
    if mode not in ("auto", "off"):
        raise UserError(f"data.proxy must be 'auto' or 'off', got {mode!r}")
    out = []
    for v in videos:
        if mode == "auto" and needs_proxy(v, short_side):
            out.append(str(ensure_proxy(v, short_side, progress=progress)))
        else:
            out.append(str(v))
    return out


def _lock_alive(lock: Path) -> bool:
    """Whether the process named in a lock file (``host pid``) still runs (other hosts: assumed yes)."""
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return True  # being written right now
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True
