"""Frame-accurate decoding: ``open_video(path, backend) -> VideoFile``.

``VideoFile.get_frames(indices, short_side=None)`` returns ``uint8 Tensor[N, H, W, 3]`` (RGB),
exactly the frames a full sequential decode returns at those indices, in the requested order
(duplicates allowed). Frame ``i`` is the frame whose pts is ``index.pts[i]`` (presentation order,
see :mod:`wtours.video.index`).

PyAV backend (the default and the reference):

* The requested indices are sorted and de-duplicated. For the first one, the decoder seeks to the
  keyframe at or before it (by that keyframe's pts) and decodes forward; each decoded frame is
  identified by its pts, never by counting, so B-frames, open GOPs, variable keyframe spacing and
  dropped leading pictures cannot shift the result. For each following target it either keeps
  decoding forward or seeks again, whichever decodes fewer frames (a seek costs the distance from
  the target's keyframe plus ``SEEK_PENALTY`` frames of flushed pipeline).
* If a seek lands after the target (a keyframe flag that is not a real random-access point, or a
  demuxer that seeks by dts), it retries from the previous keyframe, and finally from the start.
* Frames are converted only when wanted, and resized inside swscale
  (``frame.reformat(width, height, format="rgb24")``) so a full-resolution 4K RGB frame is never
  built when a smaller size is asked for.
* A packet that fails to decode is skipped, counted (``stats["corrupt_packets"]``) and logged; a
  requested frame that never comes out of the decoder (lost to corruption or a truncated tail) is
  replaced by the nearest decoded frame, counted as ``missing_frames`` and logged. Only when no
  frame at all can be decoded is a :class:`VideoError` raised.
* ``thread_type="AUTO"`` (frame + slice threads); ``threads`` caps the thread count.
* Rotated footage (a display matrix, see :mod:`wtours.video.index`) comes out upright: the frame
  is scaled in its coded orientation, then turned by the index's ``orientation`` (a numpy view,
  no extra pass), so ``width`` / ``height`` and every returned frame are the displayed ones.

decord backend (optional, ``backend="decord"``): decord 0.6 is known to return wrong frames for
HEVC with open GOP / B-frames and cannot open AV1 (measured, see the team's ecosystem notes §9), so
this backend refuses those streams with a one-line :class:`VideoError`, and checks decord's frame
count and per-frame timestamps against the packet index before use. It refuses rotated videos (a
display matrix) too: decord 0.6 turns them itself at the native size but returns scrambled frames
when asked to resize a 90-degree one (measured); ``wtours prepare`` writes an upright proxy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from wtours.errors import UserError, VideoError
from wtours.video.index import (
    VideoIndex,
    _ff_reason,
    check_video_path,
    coded_size,
    first_video_stream,
    frame_orientation,
    index_video,
    open_container,
    orient,
)

log = logging.getLogger(__name__)

BACKENDS = ("pyav", "decord")
# swscale's area-averaging filter: anti-aliased for the large (4K -> 256-480 px) downscales of training,
# and ~35 % cheaper than its default bilinear (6.5 -> 4.2 ms per 4K frame to 456x256 on our CPUs).
SCALER = "AREA"
SEEK_PENALTY = 4  # frames: extra decode cost charged to a seek (flushed frame-thread pipeline)


# -- output geometry ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Scale the decoded frame to ``scale_w x scale_h`` in swscale, then crop ``out_w x out_h``
    at ``(crop_x, crop_y)``. ``scale_w == 0`` means: keep the native size."""

    scale_w: int
    scale_h: int
    crop_x: int
    crop_y: int
    out_w: int
    out_h: int

    @property
    def native(self) -> bool:
        return self.scale_w == 0


def _even(x: float) -> int:
    return max(2, int(round(x / 2.0)) * 2)


def clip_size(short_side: int, aspect: float) -> tuple[int, int]:
    """Output ``(H, W)`` for a short side and an aspect ratio W/H; both multiples of 2."""
    if short_side <= 0 or aspect <= 0:
        raise UserError(f"short side ({short_side}) and aspect ({aspect}) must be positive")
    if aspect >= 1:
        return _even(short_side), _even(short_side * aspect)
    return _even(short_side / aspect), _even(short_side)


def make_geometry(width: int, height: int, short_side: int | None = None, aspect: float | None = None) -> Geometry:
    """Geometry for a ``width x height`` video.

    * no ``short_side``: native size.
    * ``short_side`` only: keep the aspect ratio, short side = ``short_side``.
    * ``short_side`` and ``aspect``: the fixed output of :func:`clip_size`; the frame is scaled to
      cover it (so the output's short side is ``short_side`` for frames at least as wide as
      ``aspect``) and the overflowing side is centre-cropped.
    """
    if short_side is None:
        if aspect is not None:
            raise UserError("aspect needs a short_side")
        return Geometry(0, 0, 0, 0, width, height)
    short_side = int(short_side)
    if short_side <= 0:
        raise UserError(f"short_side must be positive, got {short_side}")
    if aspect is None:
        f = short_side / min(width, height)
        sw, sh = max(1, round(width * f)), max(1, round(height * f))
        if width <= height:
            sw = short_side
        else:
            sh = short_side
        return Geometry(sw, sh, 0, 0, sw, sh)
    out_h, out_w = clip_size(short_side, aspect)
    f = max(out_h / height, out_w / width)
    sw, sh = max(out_w, round(width * f)), max(out_h, round(height * f))
    return Geometry(sw, sh, (sw - out_w) // 2, (sh - out_h) // 2, out_w, out_h)


def decode_cost(index: VideoIndex, targets: np.ndarray) -> int:
    """Frames the PyAV strategy decodes to produce sorted unique ``targets`` (the cost model)."""
    cost, cur = 0, -1
    for t in np.asarray(targets, dtype=np.int64).tolist():
        kf = index.keyframe_at_or_before(t)
        if cur < 0 or t <= cur or kf - cur > SEEK_PENALTY:
            cost += t - kf + 1
        else:
            cost += t - cur
        cur = t
    return cost


# -- the file object ------------------------------------------------------------------------------


class VideoFile:
    """One video, opened lazily (picklable: containers are re-opened in the process that uses them)."""

    backend = "base"

    def __init__(self, path: str | Path, index: VideoIndex | None = None, threads: int = 0):
        self.path = str(path)
        self.index = index if index is not None else index_video(path)
        self.threads = int(threads)
        self.stats = {"decoded_frames": 0, "converted_frames": 0, "corrupt_packets": 0, "missing_frames": 0}

    # metadata
    def __len__(self) -> int:
        return self.index.num_frames

    @property
    def fps(self) -> float:
        return self.index.fps

    @property
    def width(self) -> int:
        return self.index.width

    @property
    def height(self) -> int:
        return self.index.height

    @property
    def duration(self) -> float:
        return self.index.duration

    def __repr__(self) -> str:
        i = self.index
        return f"{type(self).__name__}({self.path!r}, {i.codec} {i.width}x{i.height}, {i.num_frames} frames @ {i.fps:.3f} fps)"

    def geometry(self, short_side: int | None = None, aspect: float | None = None) -> Geometry:
        return make_geometry(self.width, self.height, short_side, aspect)

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if idx.ndim != 1:
            idx = idx.reshape(-1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            if not np.all(np.equal(np.mod(idx, 1), 0)):
                raise UserError("frame indices must be integers", path=self.path)
            idx = idx.astype(np.int64)
        idx = idx.astype(np.int64)
        n = len(self)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise VideoError(f"frame index {int(bad[0])} out of range (the video has {n} frames: 0..{n - 1})",
                             path=self.path)
        return idx

    def get_frames(self, indices: Sequence[int] | np.ndarray | torch.Tensor, short_side: int | None = None,
                   *, aspect: float | None = None) -> torch.Tensor:
        """``uint8 Tensor[N, H, W, 3]``: the frames at ``indices`` (any order, repeats allowed)."""
        idx = self._check_indices(indices)
        geom = self.geometry(short_side, aspect)
        out = np.empty((idx.size, geom.out_h, geom.out_w, 3), dtype=np.uint8)
        if idx.size:
            uniq, inverse = np.unique(idx, return_inverse=True)
            got = np.empty((uniq.size, geom.out_h, geom.out_w, 3), dtype=np.uint8)
            k = 0
            for fi, arr in self.iter_frames(uniq, geom):
                got[k] = arr
                k += 1
            assert k == uniq.size, (k, uniq.size)
            out[:] = got[inverse.reshape(-1)]
        return torch.from_numpy(out)

    def iter_frames(self, targets: np.ndarray, geom: Geometry) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(frame_index, uint8[H, W, 3])`` for sorted unique in-range ``targets``, in order."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        d = self.__dict__.copy()
        for k in list(d):
            if k.startswith("_live"):
                d[k] = None
        return d


class PyAVVideo(VideoFile):
    backend = "pyav"

    def __init__(self, path, index=None, threads: int = 0):
        super().__init__(path, index, threads)
        self._live_container = None
        self._live_stream = None

    def close(self) -> None:
        if self._live_container is not None:
            try:
                self._live_container.close()
            finally:
                self._live_container = None
                self._live_stream = None

    def _open(self):
        if self._live_container is None:
            check_video_path(self.path)
            st = os.stat(self.path)
            if st.st_size != self.index.size_bytes or st.st_mtime_ns != self.index.mtime_ns:
                raise VideoError("the file changed since it was indexed; re-index it", path=self.path)
            c = open_container(self.path)
            s = first_video_stream(c, self.path)
            s.thread_type = "AUTO"
            if self.threads > 0:
                s.codec_context.thread_count = self.threads
            self._live_container, self._live_stream = c, s
        return self._live_container, self._live_stream

    # frames
    def _convert(self, frame, geom: Geometry) -> np.ndarray:
        o = self.index.orientation
        if geom.native:
            arr = orient(frame.to_ndarray(format="rgb24"), o)
        else:
            sw, sh = coded_size(geom.scale_w, geom.scale_h, o)  # scale before turning upright
            arr = orient(frame.reformat(width=sw, height=sh, format="rgb24", interpolation=SCALER).to_ndarray(), o)
            if geom.crop_x or geom.crop_y or geom.scale_w != geom.out_w or geom.scale_h != geom.out_h:
                arr = arr[geom.crop_y: geom.crop_y + geom.out_h, geom.crop_x: geom.crop_x + geom.out_w]
        self.stats["converted_frames"] += 1
        return arr

    def _decoded(self, container, stream) -> Iterator:
        """Decoded frames from the current position; corrupt packets are skipped and counted."""
        import av

        demux = container.demux(stream)
        while True:
            try:
                pkt = next(demux)
            except StopIteration:
                return
            except av.error.EOFError:
                return
            except av.error.FFmpegError as e:
                log.warning("%s: demuxing stopped (%s); treating it as the end of the stream", self.path, _ff_reason(e))
                return
            try:
                frames = pkt.decode()
            except av.error.FFmpegError as e:
                self.stats["corrupt_packets"] += 1
                log.warning("%s: skipped a corrupt packet at pts %s (%s)", self.path, pkt.pts, _ff_reason(e))
                continue
            for fr in frames:
                self.stats["decoded_frames"] += 1
                yield fr

    def _seek(self, container, stream, frame: int) -> None:
        import av

        try:
            container.seek(int(self.index.pts[frame]), stream=stream, backward=True, any_frame=False)
        except av.error.FFmpegError as e:
            raise VideoError(f"cannot seek to frame {frame} ({_ff_reason(e)})", path=self.path) from None

    def iter_frames(self, targets, geom):
        targets = np.asarray(targets, dtype=np.int64)
        n = int(targets.size)
        kfs = self.index.keyframes
        state = {"pos": 0, "position": -1, "last": None}
        back = 0  # after a seek landed past its target: how many keyframes further back to go
        while state["pos"] < n:
            t = int(targets[state["pos"]])
            container, stream = self._open()
            ki = int(np.searchsorted(kfs, t, side="right")) - 1 - back
            kf = int(kfs[ki]) if ki >= 0 else 0
            position = state["position"]
            if back == 0 and position >= 0 and t > position and kf - position <= SEEK_PENALTY:
                can_go_back = False  # keep decoding forward
            elif ki < 0:
                self.close()  # last resort: decode from the very beginning of the file
                container, stream = self._open()
                can_go_back = False
            else:
                self._seek(container, stream, kf)
                can_go_back = True
            status = yield from self._run(container, stream, targets, state, geom, can_go_back)
            if status == "late":
                back += 1
                state["position"] = -1
                continue
            back = 0
            if status == "eof" and state["pos"] < n:
                state["position"] = -1
                last = state["last"]
                if last is None:
                    raise VideoError(f"no frame could be decoded at or after frame {t}", path=self.path)
                arr = self._convert(last, geom)
                while state["pos"] < n:
                    self.stats["missing_frames"] += 1
                    log.warning("%s: frame %d is past the last decodable frame; repeating frame %s",
                                self.path, int(targets[state["pos"]]), self.index.frame_of_pts(last.pts))
                    yield int(targets[state["pos"]]), arr
                    state["pos"] += 1

    def _run(self, container, stream, targets, state, geom, can_go_back):
        """Decode forward, yielding wanted frames; returns "seek", "late", "eof" or "done"."""
        idx = self.index
        n = int(targets.size)
        first = True
        gen = self._decoded(container, stream)
        try:
            for fr in gen:
                ts = fr.pts if fr.pts is not None else fr.dts
                fi = idx.frame_of_pts(ts) if ts is not None else state["position"] + 1
                if fi < 0:
                    continue  # a timestamp the index does not know: not a frame of the stream
                pos = state["pos"]
                if first:
                    first = False
                    if can_go_back and fi > int(targets[pos]):
                        return "late"
                state["position"] = fi
                state["last"] = fr
                while pos < n and int(targets[pos]) < fi:
                    # a wanted frame never came out of the decoder (corrupt data): use this one
                    self.stats["missing_frames"] += 1
                    log.warning("%s: frame %d could not be decoded; using frame %d instead",
                                self.path, int(targets[pos]), fi)
                    yield int(targets[pos]), self._convert(fr, geom)
                    pos += 1
                    state["pos"] = pos
                if pos < n and int(targets[pos]) == fi:
                    yield fi, self._convert(fr, geom)
                    pos += 1
                    state["pos"] = pos
                    if pos >= n:
                        return "done"
                    if idx.keyframe_at_or_before(int(targets[pos])) - fi > SEEK_PENALTY:
                        return "seek"
            if first and can_go_back:
                return "late"  # the seek produced nothing at all: start further back
            return "eof"
        finally:
            gen.close()


class DecordVideo(VideoFile):
    """decord 0.6 backend, verified against the packet index; refuses streams it gets wrong."""

    backend = "decord"

    def __init__(self, path, index=None, threads: int = 0):
        super().__init__(path, index, threads)
        i = self.index
        if i.codec in ("av1", "libdav1d", "libaom-av1"):
            raise VideoError("the decord backend cannot open AV1 streams (decord 0.6); use --backends pyav",
                             path=self.path)
        if i.codec == "hevc" and i.has_b_frames:
            raise VideoError("the decord backend returns wrong frames for HEVC with B-frames/open GOP; "
                             "use the pyav backend", path=self.path)
        if i.codec in ("vp8",):
            raise VideoError("the decord backend seeks VP8 wrongly; use the pyav backend", path=self.path)
        if i.orientation:
            raise VideoError(f"the decord backend mishandles rotated videos (display matrix: '{i.orientation}'); "
                             "use the pyav backend, or make an upright proxy with 'wtours prepare'", path=self.path)
        try:
            import decord  # noqa: F401
        except ImportError:
            raise UserError("the decord backend needs the 'decord' package (pip install decord)") from None
        self._live_readers: dict | None = {}
        self._verified = False

    def close(self) -> None:
        self._live_readers = {}

    def _reader(self, geom: Geometry):
        import decord

        if self._live_readers is None:
            self._live_readers = {}
        key = (geom.scale_w, geom.scale_h)
        vr = self._live_readers.get(key)
        if vr is None:
            kw = {} if geom.native else {"width": geom.scale_w, "height": geom.scale_h}
            try:
                vr = decord.VideoReader(self.path, ctx=decord.cpu(0), num_threads=max(0, self.threads), **kw)
            except Exception as e:  # decord raises DECORDError (a RuntimeError) with a long C++ trace
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise VideoError(f"decord cannot open it ({msg[:160]})", path=self.path) from None
            self._verify(vr)
            self._live_readers = {key: vr}  # keep one reader: decord readers hold large buffers
        return vr

    def _verify(self, vr) -> None:
        i = self.index
        if len(vr) != i.num_frames:
            raise VideoError(f"decord counts {len(vr)} frames but the stream has {i.num_frames}; "
                             "use the pyav backend", path=self.path)
        if self._verified:
            return
        ts = np.asarray(vr.get_frame_timestamp(np.arange(len(vr))))[:, 0]
        ref = (i.pts - i.pts[0]).astype(np.float64) * float(i.time_base)
        tol = 0.5 / max(i.fps, 1e-6)
        if ts.shape[0] != ref.shape[0] or np.abs((ts - ts[0]) - ref).max() > tol:
            raise VideoError("decord's frame timestamps disagree with the packet index; use the pyav backend",
                             path=self.path)
        self._verified = True

    def iter_frames(self, targets, geom, chunk: int = 16):
        targets = np.asarray(targets, dtype=np.int64)
        if targets.size == 0:
            return
        vr = self._reader(geom)
        self.stats["decoded_frames"] += decode_cost(self.index, targets)
        for s in range(0, targets.size, chunk):
            sel = targets[s: s + chunk]
            try:
                batch = vr.get_batch(sel.tolist()).asnumpy()
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise VideoError(f"decord failed to decode frames {int(sel[0])}..{int(sel[-1])} ({msg[:160]})",
                                 path=self.path) from None
            if not geom.native:
                batch = batch[:, geom.crop_y: geom.crop_y + geom.out_h, geom.crop_x: geom.crop_x + geom.out_w]
            for fi, arr in zip(sel.tolist(), batch):
                self.stats["converted_frames"] += 1
                yield fi, arr


def open_video(path: str | Path, backend: str = "pyav", *, index: VideoIndex | None = None,
               threads: int = 0) -> VideoFile:
    """Open a video for frame-accurate random access (see the module docstring).

    Raises a one-line :class:`VideoError` for a missing path, a directory, a non-video or corrupt
    file, a video with no frames, or a stream the backend cannot decode correctly.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown video backend {backend!r} (choose from {', '.join(BACKENDS)})")
    check_video_path(path)
    if index is None:
        index = index_video(path)
    if index.num_frames <= 0:
        raise VideoError("video stream has no frames", path=path)
    cls = PyAVVideo if backend == "pyav" else DecordVideo
    return cls(path, index, threads=threads)


def read_all_frames(path: str | Path, short_side: int | None = None) -> Iterable[np.ndarray]:
    """Reference: every frame of a plain sequential PyAV decode, as ``uint8[H, W, 3]``, turned
    upright by each frame's own display matrix (as a player shows it)."""
    c = open_container(path)
    try:
        s = first_video_stream(c, path)
        s.thread_type = "AUTO"
        for fr in c.decode(s):
            o = frame_orientation(fr)
            if short_side is None:
                yield orient(fr.to_ndarray(format="rgb24"), o)
            else:
                w, h = coded_size(fr.width, fr.height, o)  # displayed size
                g = make_geometry(w, h, short_side)
                sw, sh = coded_size(g.scale_w, g.scale_h, o)
                yield orient(fr.reformat(width=sw, height=sh, format="rgb24", interpolation=SCALER).to_ndarray(), o)
    finally:
        c.close()
