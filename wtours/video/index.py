"""Packet index of a video: presentation timestamps of every frame and the keyframes.

``index_video(path)`` demuxes the first video stream once (no frame is decoded), collects every
packet's pts and keyframe flag, and sorts the pts to get the **presentation order**: frame ``i``
of the video is the frame whose pts is ``index.pts[i]``, exactly the ``i``-th frame a full
sequential decode returns. ``index.keyframes`` are the frame indices of the random-access points
(packets flagged as keyframes). The decoders (:mod:`wtours.video.decode`) use it to map a frame
index to a pts and to seek to the keyframe at or before a requested frame.

Packets flagged *discard* (an MP4 edit list hides them) and empty packets are left out, because
the decoder drops their frames too.

Cache: a JSON file, ``.<video name>.wtours-index.json`` beside the video when that folder is
writable, else ``~/.cache/wtours/index/`` (``$WTOURS_CACHE/index/`` when the environment variable
``WTOURS_CACHE`` is set; then that folder is always used). The pts and keyframe arrays are stored
delta-encoded, zlib-compressed and base64'd: a two-hour 60 fps video (432k frames, constant frame
rate) takes a few kB. The cache is keyed by absolute path, size and mtime and rebuilt when the
file changes.

Orientation: phone footage is usually stored sideways with a *display matrix* (the old ``rotate``
tag) telling players to turn it. The index records the transform a player applies
(``orientation``, named after FFmpeg's filters: ``clock``, ``cclock``, ``rotate180``, ``hflip``,
``vflip``, ``clock_flip``, ``cclock_flip``; ``""`` for none), chosen from the matrix exactly as
``ffmpeg``'s autorotate does, and ``width`` / ``height`` are the *displayed* size (the coded one is
``coded_width`` / ``coded_height``). The matrix is read from the first decoded frame's side data
(this PyAV exposes it there, not on the stream), so building an index decodes one frame. Every
decoder applies the transform, so frames come out upright. A rotation that is not a multiple of
90 degrees is refused.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import stat
import struct
import sys
import zlib
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from wtours.errors import UserError, VideoError

log = logging.getLogger(__name__)

INDEX_VERSION = 3  # 2: displayed size + orientation (display matrix); 3: declared_frames (truncated files)


@dataclasses.dataclass
class VideoIndex:
    """Everything the decoders and the clip sampler need to know about one video stream.

    ``pts``: int64[num_frames], presentation timestamps in ``time_base`` units, ascending.
    ``keyframes``: int64[K], frame indices (into ``pts``) of keyframes, ascending.
    """

    path: str
    size_bytes: int
    mtime: float
    mtime_ns: int
    container: str
    codec: str
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    time_base: Fraction
    pts: np.ndarray
    keyframes: np.ndarray
    stream_index: int = 0
    pix_fmt: str | None = None
    bit_rate: int | None = None
    has_b_frames: bool = False  # decode order differs from presentation order
    max_reorder: int = 0  # largest |decode position - presentation position| over packets
    corrupt_packets: int = 0
    orientation: str = ""  # transform from decoded to displayed frames (see the module doc)
    coded_width: int = 0  # size of the decoded frames (before ``orientation``); 0: same as displayed
    coded_height: int = 0
    declared_frames: int = 0  # what the container's header promises (frames, or duration x fps); 0: unknown
    version: int = INDEX_VERSION

    @property
    def truncated(self) -> bool:
        """Fewer frames could be read than the header declares (by more than 2 % + 2 frames): a cut file."""
        return self.declared_frames > self.num_frames * 1.02 + 2

    # -- lookups ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_frames

    def frame_of_pts(self, pts: int) -> int:
        """Frame index of an exact pts, or -1 when no frame has that pts."""
        i = int(np.searchsorted(self.pts, pts))
        return i if i < self.num_frames and int(self.pts[i]) == pts else -1

    def keyframe_at_or_before(self, frame: int) -> int:
        """Frame index of the last keyframe at or before ``frame`` (0 when none is flagged)."""
        j = int(np.searchsorted(self.keyframes, frame, side="right")) - 1
        return int(self.keyframes[j]) if j >= 0 else 0

    def seconds(self, frame: int) -> float:
        return float((int(self.pts[frame]) - int(self.pts[0])) * self.time_base)

    @property
    def mean_keyframe_spacing(self) -> float:
        return self.num_frames / max(1, len(self.keyframes))

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly summary printed by ``wtours index``."""
        return {
            "path": self.path,
            "container": self.container,
            "codec": self.codec,
            "size_bytes": self.size_bytes,
            "width": self.width,
            "height": self.height,
            "fps": round(self.fps, 6),
            "num_frames": self.num_frames,
            "duration": round(self.duration, 6),
            "keyframes": int(len(self.keyframes)),
            "mean_keyframe_spacing": round(self.mean_keyframe_spacing, 3),
            "max_keyframe_spacing": int(np.diff(np.append(self.keyframes, self.num_frames)).max())
            if len(self.keyframes) else self.num_frames,
            "has_b_frames": self.has_b_frames,
            "pix_fmt": self.pix_fmt,
            "bit_rate": self.bit_rate,
            "time_base": str(self.time_base),
            "orientation": self.orientation or None,
            "coded_width": self.coded_width or self.width,
            "coded_height": self.coded_height or self.height,
        }

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["format"] = "wtours-video-index"
        d["time_base"] = str(self.time_base)
        d["pts"] = _pack_int64(self.pts)
        d["keyframes"] = _pack_int64(self.keyframes)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VideoIndex:
        d = dict(d)
        if d.pop("format", None) != "wtours-video-index" or d.get("version") != INDEX_VERSION:
            raise ValueError("not a wtours index of this version")
        d["time_base"] = Fraction(d["time_base"])
        d["pts"] = _unpack_int64(d["pts"])
        d["keyframes"] = _unpack_int64(d["keyframes"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _pack_int64(a: np.ndarray) -> dict[str, Any]:
    """Delta-encode, zlib and base64 an int64 array (constant steps compress to almost nothing)."""
    a = np.asarray(a, dtype=np.int64)
    deltas = np.diff(a, prepend=np.int64(0)).astype("<i8")
    return {"n": int(a.size), "enc": "delta-int64le-zlib-b64",
            "data": base64.b64encode(zlib.compress(deltas.tobytes(), 6)).decode("ascii")}


def _unpack_int64(d: dict[str, Any]) -> np.ndarray:
    if d.get("enc") != "delta-int64le-zlib-b64":
        raise ValueError("unknown array encoding")
    deltas = np.frombuffer(zlib.decompress(base64.b64decode(d["data"])), dtype="<i8")
    if deltas.size != d["n"]:
        raise ValueError("array length mismatch")
    return np.cumsum(deltas).astype(np.int64)


# -- opening files --------------------------------------------------------------------------------


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a non-regular, non-directory ``st_mode`` is, in words ("a FIFO", ...)."""
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def missing_reason(path: str | Path, missing: str = "no such file") -> str:
    """Why ``path`` cannot be found, in words: a symbolic link loop or a broken link is named as such
    (``Path.exists`` is False for both), else ``missing``."""
    p = Path(path).expanduser()
    try:
        p.stat()
    except FileNotFoundError:
        if p.is_symlink():
            try:
                return f"broken symbolic link (its target {os.readlink(p)} does not exist)"
            except OSError:
                return "broken symbolic link"
        return missing
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (too many levels of symbolic links)"
        return f"cannot access ({e.strerror or e})"
    return missing


def check_regular_file(path: str | Path, what: str = "file", error: type = UserError) -> Path:
    """``path`` if it is an existing regular file (links followed), else a one-line ``error``
    saying what it is instead. Only ``stat`` is called: a FIFO is never opened, so never blocks."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"{what} not found ({missing_reason(p)})", path=p) from None
    except OSError as e:
        raise error(f"cannot access {what} ({missing_reason(p, e.strerror or str(e))})", path=p) from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"is a directory, not a {what}", path=p)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"not a regular file ({file_kind(st.st_mode)}); expected a {what}", path=p)
    return p


def check_video_path(path: str | Path) -> Path:
    """A readable regular file, or a one-line :class:`VideoError` naming it (a FIFO, a device,
    a socket are named as such and never opened)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise VideoError(missing_reason(p), path=p)
    if p.is_dir():
        raise VideoError("is a directory, not a video file", path=p)
    check_regular_file(p, "video file", VideoError)
    if not os.access(p, os.R_OK):
        raise VideoError("file is not readable (permission denied)", path=p)
    if p.stat().st_size == 0:
        raise VideoError("file is empty (0 bytes)", path=p)
    return p


def open_container(path: str | Path):
    """``av.open`` with every failure turned into a one-line :class:`VideoError`."""
    import av

    try:
        return av.open(str(path), mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as e:
        raise VideoError(f"cannot open as a video ({_ff_reason(e)})", path=path) from None
    except (OSError, ValueError) as e:
        raise VideoError(f"cannot open as a video ({e})", path=path) from None


def first_video_stream(container, path):
    streams = container.streams.video
    if not streams:
        raise VideoError("has no video stream", path=path)
    return streams[0]


def _ff_reason(e: Exception) -> str:
    s = getattr(e, "strerror", None) or str(e)
    return str(s).split("\n")[0].strip() or type(e).__name__


# -- orientation ----------------------------------------------------------------------------------

# transform name -> (swaps width and height, function on an [..., H, W, C] array)
ORIENTATIONS = {
    "": (False, lambda a: a),
    "clock": (True, lambda a: np.rot90(a, -1, axes=(-3, -2))),
    "cclock": (True, lambda a: np.rot90(a, 1, axes=(-3, -2))),
    "rotate180": (False, lambda a: a[..., ::-1, ::-1, :]),
    "hflip": (False, lambda a: a[..., :, ::-1, :]),
    "vflip": (False, lambda a: a[..., ::-1, :, :]),
    "cclock_flip": (True, lambda a: np.swapaxes(a, -3, -2)),  # transpose
    "clock_flip": (True, lambda a: np.swapaxes(a[..., ::-1, ::-1, :], -3, -2)),  # anti-transpose
}


def orientation_from_matrix(m: tuple[int, ...] | list[int] | None) -> str:
    """The transform a player applies for a display matrix (9 int32, FFmpeg's layout) -> a name of
    :data:`ORIENTATIONS`; the same choice as ffmpeg's autorotate (``fftools``). Raises
    ``ValueError`` for a rotation that is not a multiple of 90 degrees."""
    if m is None:
        return ""
    s0, s1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if s0 == 0 or s1 == 0:
        return ""  # degenerate matrix: players ignore it
    rotation = -math.degrees(math.atan2(m[1] / s1, m[0] / s0))  # av_display_rotation_get
    theta = -round(rotation)
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return "cclock_flip" if m[3] > 0 else "clock"
    if abs(theta - 180) < 1:
        name = ("h" if m[0] < 0 else "") + ("v" if m[4] < 0 else "")
        return {"hv": "rotate180", "h": "hflip", "v": "vflip"}.get(name, "")
    if abs(theta - 270) < 1:
        return "clock_flip" if m[3] < 0 else "cclock"
    if abs(theta) > 1:
        raise ValueError(f"display matrix turns the picture {theta:g} degrees clockwise; only multiples of 90 are supported")
    return "vflip" if m[4] < 0 else ""


def frame_display_matrix(frame) -> tuple[int, ...] | None:
    """The display matrix of a decoded PyAV frame (its ``DISPLAYMATRIX`` side data), if any."""
    try:
        for sd in frame.side_data.keys():
            if "DISPLAYMATRIX" in str(getattr(sd, "type", "")):
                raw = bytes(sd)
                if len(raw) >= 36:
                    return struct.unpack("<9i" if sys.byteorder == "little" else ">9i", raw[:36])
    except Exception:  # noqa: BLE001 - side data this PyAV cannot read: no rotation known
        return None
    return None


def frame_orientation(frame) -> str:
    """:func:`orientation_from_matrix` of a decoded PyAV frame."""
    return orientation_from_matrix(frame_display_matrix(frame))


def orient(arr: np.ndarray, orientation: str) -> np.ndarray:
    """Apply a transform of :data:`ORIENTATIONS` to ``[..., H, W, C]`` (a view, no copy)."""
    return ORIENTATIONS[orientation][1](arr) if orientation else arr


def coded_size(width: int, height: int, orientation: str) -> tuple[int, int]:
    """Decoded (coded) ``(width, height)`` that shows as ``width x height`` after ``orientation``."""
    return (height, width) if orientation and ORIENTATIONS[orientation][0] else (width, height)


def _probe_orientation(path: Path) -> str:
    """Orientation of the first video stream, from its first decoded frame ("" if none decodes)."""
    import av

    try:
        container = open_container(path)
    except VideoError:
        return ""
    try:
        stream = first_video_stream(container, path)
        for frame in container.decode(stream):
            m = frame_display_matrix(frame)
            try:
                return orientation_from_matrix(m)
            except ValueError as e:
                raise VideoError(str(e), path=path) from None
    except av.error.FFmpegError:
        return ""
    finally:
        container.close()
    return ""


# -- building -------------------------------------------------------------------------------------


def build_index(path: str | Path) -> VideoIndex:
    """Demux the first video stream of ``path`` (no decoding) into a :class:`VideoIndex`."""
    import av

    p = check_video_path(path)
    st = p.stat()
    container = open_container(p)
    try:
        stream = first_video_stream(container, p)
        ctx = stream.codec_context
        pts_list: list[int] = []
        key_list: list[bool] = []
        corrupt = 0
        missing_pts = 0
        try:
            for pkt in container.demux(stream):
                if pkt.size == 0 or pkt.is_discard:
                    continue
                ts = pkt.pts
                if ts is None:
                    ts = pkt.dts
                    missing_pts += 1
                if ts is None:
                    continue
                pts_list.append(ts)
                key_list.append(pkt.is_keyframe)
                if pkt.is_corrupt:
                    corrupt += 1
        except av.error.FFmpegError as e:
            if not pts_list:
                raise VideoError(f"cannot read packets ({_ff_reason(e)})", path=p) from None
            # A truncated tail: index what could be read, like a sequential decode would.
            log.warning("%s: demuxing stopped early after %d packets (%s)", p, len(pts_list), _ff_reason(e))
        if not pts_list:
            raise VideoError("video stream has no frames", path=p)
        dec_pts = np.asarray(pts_list, dtype=np.int64)
        keys = np.asarray(key_list, dtype=bool)
        order = np.argsort(dec_pts, kind="stable")
        pts = dec_pts[order]
        if np.any(np.diff(pts) == 0):
            # duplicated timestamps (broken muxer): keep the first of each; decoders key on pts
            uniq = np.concatenate([[True], np.diff(pts) != 0])
            log.warning("%s: %d packets share a timestamp with another", p, int((~uniq).sum()))
            pts = pts[uniq]
            order = order[uniq]
        # presentation position of each packet in decode order
        pres_pos = np.empty(dec_pts.size, dtype=np.int64)
        pres_pos[order] = np.arange(order.size)
        kept = np.zeros(dec_pts.size, dtype=bool)
        kept[order] = True
        key_frames = np.sort(pres_pos[keys & kept])
        reorder = np.abs(pres_pos[kept] - np.arange(dec_pts.size)[kept]) if kept.all() else np.zeros(1, np.int64)
        max_reorder = int(reorder.max()) if reorder.size else 0
        if key_frames.size == 0 or key_frames[0] != 0:
            key_frames = np.concatenate([[0], key_frames]).astype(np.int64)
        tb = Fraction(stream.time_base) if stream.time_base else Fraction(1, 90000)
        n = int(pts.size)
        step = _frame_step(pts, stream, tb)
        duration = float((int(pts[-1]) - int(pts[0]) + step) * tb)
        if stream.average_rate:
            fps = float(stream.average_rate)
        elif duration > 0:
            fps = n / duration
        else:
            fps = 0.0
        if not fps or not math.isfinite(fps):
            fps = n / duration if duration > 0 else 25.0
        declared = int(stream.frames or 0)
        if not declared:  # the stream's duration, or the container's when the video is its only stream
            if stream.duration:
                declared = round(float(stream.duration * tb) * fps)
            elif container.duration and len(container.streams) == 1:
                declared = round(container.duration / 1_000_000 * fps)
        orientation = _probe_orientation(p)
        width, height = coded_size(int(ctx.width), int(ctx.height), orientation)  # displayed size
        return VideoIndex(
            path=str(p.resolve()),
            size_bytes=int(st.st_size),
            mtime=float(st.st_mtime),
            mtime_ns=int(st.st_mtime_ns),
            container=container.format.name,
            codec=_CODEC_NAMES.get(ctx.name, ctx.name),
            width=width,
            height=height,
            fps=fps,
            num_frames=n,
            duration=duration,
            time_base=tb,
            pts=pts,
            keyframes=key_frames.astype(np.int64),
            stream_index=int(stream.index),
            pix_fmt=ctx.pix_fmt,
            bit_rate=int(ctx.bit_rate or container.bit_rate or 0) or None,
            has_b_frames=bool(max_reorder > 0),
            max_reorder=max_reorder,
            corrupt_packets=corrupt,
            orientation=orientation,
            coded_width=int(ctx.width),
            coded_height=int(ctx.height),
            declared_frames=declared,
        )
    finally:
        container.close()


_CODEC_NAMES = {"libdav1d": "av1", "libaom-av1": "av1", "av1_cuvid": "av1", "libvpx-vp9": "vp9", "libvpx": "vp8"}


def _frame_step(pts: np.ndarray, stream, tb: Fraction) -> int:
    """Duration of one frame in time_base units (median pts step, else from the frame rate)."""
    if pts.size > 1:
        return int(np.median(np.diff(pts)))
    rate = stream.average_rate or stream.base_rate
    return int(round(1 / (rate * tb))) if rate else 0


# -- cache ----------------------------------------------------------------------------------------


def cache_dir() -> Path:
    env = os.environ.get("WTOURS_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "wtours"
    return base / "index"


def _cache_candidates(p: Path) -> list[Path]:
    """Where the index of ``p`` may live, in lookup order."""
    ap = p.resolve()
    key = hashlib.sha1(str(ap).encode()).hexdigest()[:16]
    in_cache = cache_dir() / f"{key}-{ap.name}.json"
    if os.environ.get("WTOURS_CACHE"):
        return [in_cache]
    return [ap.parent / f".{ap.name}.wtours-index.json", in_cache]


def _load_cached(p: Path) -> VideoIndex | None:
    st = p.stat()
    ap = str(p.resolve())
    for c in _cache_candidates(p):
        try:
            with open(c, encoding="utf-8") as f:
                idx = VideoIndex.from_json(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if idx.path == ap and idx.size_bytes == st.st_size and idx.mtime_ns == st.st_mtime_ns:
            return idx
    return None


def _store(idx: VideoIndex, p: Path) -> Path | None:
    from wtours.fsutil import atomic_open

    text = json.dumps(idx.to_json(), separators=(",", ":"))
    for c in _cache_candidates(p):
        try:
            if not os.access(c.parent, os.W_OK) and c.parent.exists():
                continue
            with atomic_open(c, "w", encoding="utf-8") as f:
                f.write(text)
            return c
        except (OSError, UserError):
            continue
    log.warning("%s: could not write the index cache anywhere", p)
    return None


def index_video(path: str | Path, rebuild: bool = False) -> VideoIndex:
    """The cached :class:`VideoIndex` of ``path`` (built by demuxing when missing or stale)."""
    p = check_video_path(path)
    if not rebuild:
        idx = _load_cached(p)
        if idx is not None:
            return idx
    idx = build_index(p)
    _store(idx, p)
    if idx.truncated:  # said once, when the index is built (the cached index stays quiet)
        log.warning("%s: the file declares %d frames but only %d could be read (%.1f of %.1f s): it looks "
                    "truncated; using the %d readable frames", p, idx.declared_frames, idx.num_frames,
                    idx.duration, idx.declared_frames / idx.fps if idx.fps else 0.0, idx.num_frames)
    return idx


def cache_path_of(path: str | Path) -> Path | None:
    """The cache file currently holding a valid index of ``path``, if any."""
    p = Path(path)
    for c in _cache_candidates(p):
        if c.exists():
            return c
    return None


# -- CLI ------------------------------------------------------------------------------------------


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _human_duration(s: float) -> str:
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{int(h)}:{int(m):02d}:{sec:06.3f}"


def format_summary(idx: VideoIndex) -> str:
    s = idx.summary()
    rotated = (f"  display matrix: coded {s['coded_width']}x{s['coded_height']}, turned upright by "
               f"'{idx.orientation}' when decoding\n") if idx.orientation else ""
    return (
        f"{idx.path}\n"
        f"  container {idx.container}, codec {idx.codec} ({idx.pix_fmt}), {idx.width}x{idx.height}, "
        f"{_human_bytes(idx.size_bytes)}\n"
        f"{rotated}"
        f"  {idx.fps:.3f} fps, {idx.num_frames} frames, duration {_human_duration(idx.duration)}"
        f"{', B-frames' if idx.has_b_frames else ''}\n"
        f"  {s['keyframes']} keyframes, mean spacing {s['mean_keyframe_spacing']:.1f} frames "
        f"(max {s['max_keyframe_spacing']})"
    )
