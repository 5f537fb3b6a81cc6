"""Training clips from long videos: a sharded, resumable ``IterableDataset`` that wastes no decodes.

A clip is ``T = frames_per_clip`` frames ``s`` frames apart (``s`` = the stride in frames; with
``stride_unit="seconds"`` it is ``round(stride * fps)`` per video), so it spans
``L = (T - 1) * s + 1`` frames (:func:`clip_span_frames`). Every item is::

    {"clip": uint8 Tensor[T, 3, H, W], "video": int, "start": int, "frames": LongTensor[T], "sample": int}

(training reads whole batches through :class:`~wtours.video.loader.ClipLoader` instead, see below)

with the same ``H, W`` for every video: the frame is scaled to cover ``clip_size(short_side,
aspect)`` in the decoder's scaler and the overflowing side is centre-cropped.

Design: phase blocks (no frame is decoded twice, none is decoded for nothing)
---------------------------------------------------------------------------
Random clip starts are expensive: each costs ``GOP/2 + L`` decoded frames for ``T`` delivered ones
(DoRA's loader: 8 frames 60 apart decode ~480 frames for 8, ratio ~60). Instead the dataset decodes
a *block* of ``s * T`` consecutive frames once, sequentially, at the training size, and cuts from it
the ``s`` clips starting at ``base + r`` for ``r = 0 .. s-1``: clip ``r`` takes frames
``base + r + j*s``, so the ``s`` clips use every frame of the block exactly once.
A *segment* is ``M`` consecutive blocks (``M = ceil(min_segment_frames / (s*T))``, 1 at the
defaults) and costs one seek. Cost model, decoded frames per delivered frame::

    ratio ~= 1 + (GOP/2 + SEEK_PENALTY) / (s*T*M)        (+ splits at worker/rank boundaries)

e.g. 60 fps, GOP 60, s=60, T=8: 1 + 34/480 = 1.07; 30 fps GOP 30: 1.04. A worker whose share of
an epoch is smaller than a segment (``clips_per_epoch / (world * workers) < s*M``) decodes whole
blocks for part of their clips, so keep ``clips_per_epoch`` large (e.g. the number of frames) for
real runs. ``stats()`` reports the measured ratio.

Coverage and order: within a *cycle* the block grid of every video is fixed by an offset
``k*s + u`` (``u`` < s random per super-cycle, ``k`` < T a permutation of the T phase groups), so
the starts of a cycle are those ``x`` with ``(x - u) mod sT`` in ``[k*s, k*s + s)``: over ``T``
consecutive cycles every valid start of every video is used exactly once (weighted by length, as
longer videos have more segments). Segments of all videos are shuffled per cycle; the clip stream
is the concatenation of cycles; epoch ``e`` is the stream slice ``[e*C', (e+1)*C')`` with
``C' = world * ceil(clips_per_epoch / world)``, so each rank gets the same number of clips and
DDP never hangs. Rank ``r`` takes the ``r``-th contiguous part.

A segment is ``M`` blocks with ``s*T*M >= min_segment_frames``, and at least ``SEGMENT_GOPS = 2``
keyframe intervals unless blocks can start on keyframes (a proxy from ``wtours prepare``: one keyframe
per second and a stride of whole seconds), so the frames decoded in vain after a seek (GOP/2 on
average) stay near 1/4 (measured 1.15-1.25 decoded per delivered on a 4K GOP-120 file); more GOPs per
segment lower that but grow the loader's pool in proportion (``lanes`` segments are held at once).

Shuffling (lanes): a batch of ``B`` clips takes one clip from each of ``lanes`` (default ``B``, at
most 32) contiguous parts of the rank's epoch in canonical order (:func:`~wtours.video.loader.lane_order`),
and the clips of a segment come in a seeded random order, so a batch covers ``lanes`` places of the
tour, far apart (15.9 distinct 8-s windows per batch of 16 in the plan of a 2-hour tour; the previous
worker-local shuffle of 3 segments gave ~2.9). Each segment is still decoded once, in one pass:
:class:`~wtours.video.loader.ClipLoader` decodes it into a shared pool and keeps its clips there until
their batches come, which costs memory (about ``lanes x s*T*M`` frames, see the loader).

Resume: ``sample`` numbers a clip's position in the rank's epoch; the plan (which clip each position
holds, which segment decodes it) is a function of the seed, the epoch, the rank, the world size and
the batch size, not of the workers or of timing, so ``set_start(n)`` skips exactly the first ``n``
positions with any number of workers. Iterating the dataset itself (without the loader) yields the
same clips one by one in ``sample`` order (in DataLoader workers: blocks of ``batch_size`` dealt
round-robin).

Everything is deterministic for ``(seed, epoch)`` (and the world/worker layout), the dataset is
picklable (spawned workers too), containers are opened lazily in the process that decodes, and
``set_epoch``/``set_start`` live in shared memory so persistent workers see them.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from wtours.errors import UserError, VideoError
from wtours.video.decode import BACKENDS, clip_size, make_geometry, open_video
from wtours.video.index import VideoIndex, index_video
from wtours.video.yuv import BT601, LoaderVideo, stream_matrix, yuv420_to_rgb

log = logging.getLogger(__name__)

SEGMENT_GOPS = 2  # keyframe intervals per segment at least, when blocks cannot start on keyframes (see above)
DEFAULT_LANES = 32  # lanes when not given: the batch size, at most this (memory grows with the lanes)
_MAX_STAT_ROWS = 257  # row 0: the main process, row w+1: DataLoader worker w
_STATS = ("decoded_frames", "delivered_frames", "corrupt_packets", "missing_frames")


def stride_frames(video_index: VideoIndex, stride: float, stride_unit: str = "frames") -> int:
    """The clip stride of one video in frames (at least 1)."""
    if stride_unit == "frames":
        return max(1, int(round(stride)))
    if stride_unit == "seconds":
        return max(1, int(round(stride * video_index.fps)))
    raise UserError(f"stride_unit must be 'frames' or 'seconds', got {stride_unit!r}")


def clip_span_frames(video_index: VideoIndex, frames_per_clip: int, stride: float,
                     stride_unit: Literal["frames", "seconds"] = "frames") -> int:
    """Frames from a clip's first frame to its last, inclusive: ``(T - 1) * s + 1``."""
    return (int(frames_per_clip) - 1) * stride_frames(video_index, stride, stride_unit) + 1


# DataLoader workers are started from a clean fork server, not forked from the training process:
# a process that has decoded video holds FFmpeg (and OpenMP) threads, and a plain fork of it can
# deadlock or crash in the child. The dataset is picklable, so this costs one import per worker.
WORKER_CONTEXT = "forkserver"


def worker_context(num_workers: int) -> str | None:
    """``multiprocessing_context`` for a ``DataLoader`` over a :class:`ClipDataset`."""
    return WORKER_CONTEXT if num_workers > 0 else None


def regular_gop(index: VideoIndex) -> int:
    """The keyframe period ``g`` when keyframes sit exactly at frames ``0, g, 2g, ...`` (a proxy from
    ``wtours prepare``, a fixed-keyint encode), else 0."""
    k = np.asarray(index.keyframes, dtype=np.int64)
    if k.size < 2 or k[0] != 0:
        return 0
    g = int(k[1])
    if g < 1 or not np.array_equal(k, np.arange(0, g * k.size, g)) or g * k.size < index.num_frames - g + 1:
        return 0
    return g


def _assign(arr: np.ndarray, dst: np.ndarray) -> None:
    dst[...] = arr


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])



class _EpochControls:
    """The public controls :class:`ClipDataset` and :class:`~wtours.video.frames.FrameFolderClips` share.

    State lives in tensors shared between the main process and DataLoader workers (also persistent
    ones), made by :meth:`_init_shared_state`: ``_state`` (epoch, start, start's epoch) and
    ``_counters`` (row 0: the main process, row w+1: DataLoader worker w; one column per name in the
    class's ``_STATS``). Needs ``_rank``, ``_world``, ``clips_per_epoch``, ``frames_per_clip``,
    ``out_h`` and ``out_w``.
    """

    _STATS: tuple[str, ...] = _STATS

    def _init_shared_state(self) -> None:
        self._state = torch.zeros(3, dtype=torch.int64).share_memory_()  # epoch, start, start's epoch
        self._state[2] = -1
        self._counters = torch.zeros(_MAX_STAT_ROWS, len(self._STATS), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate (clears a ``set_start`` made for another epoch)."""
        self._state[0] = int(epoch)

    def set_start(self, sample: int) -> None:
        """Resume the current epoch: skip its first ``sample`` samples (per rank). Call after set_epoch."""
        if sample < 0:
            raise UserError(f"set_start needs a sample >= 0, got {sample}")
        self._state[1] = int(sample)
        self._state[2] = int(self._state[0])

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    def position(self) -> tuple[int, int]:
        """``(epoch, first sample)`` the next iteration delivers."""
        epoch = int(self._state[0])
        return epoch, (int(self._state[1]) if int(self._state[2]) == epoch else 0)

    def rank_world(self) -> tuple[int, int]:
        if self._rank is not None or self._world is not None:
            r, w = int(self._rank or 0), int(self._world or 1)
        else:
            r, w = 0, 1
            try:
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():
                    r, w = dist.get_rank(), dist.get_world_size()
                else:
                    raise RuntimeError
            except Exception:
                r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= r < w:
            raise UserError(f"bad rank/world size: {r}/{w}")
        return r, w

    @property
    def samples_per_rank(self) -> int:
        return math.ceil(self.clips_per_epoch / self.rank_world()[1])

    def __len__(self) -> int:
        return self.samples_per_rank

    def stats(self) -> dict[str, float]:
        """Counters summed over this process and its DataLoader workers (``ratio``: decoded per delivered)."""
        d = dict(zip(self._STATS, (int(x) for x in self._counters.sum(0).tolist())))
        d["ratio"] = d["decoded_frames"] / d["delivered_frames"] if d["delivered_frames"] else float("nan")
        return d

    def reset_stats(self) -> None:
        self._counters.zero_()

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        return (self.frames_per_clip, 3, self.out_h, self.out_w)

    def _pickle_state(self, *drop: str) -> dict:
        """``__dict__`` less ``drop``, with the rank and world size fixed (spawned workers cannot see
        the process group)."""
        d = self.__dict__.copy()
        for k in drop:
            d.pop(k, None)
        if d.get("_rank") is None and d.get("_world") is None:
            d["_rank"], d["_world"] = self.rank_world()
        return d


class ClipDataset(_EpochControls, IterableDataset):
    """Sharded, deterministic, resumable clips of ``frames_per_clip`` frames (see the module doc).

    Iterating it yields one item per clip (``clip`` ``[T, 3, H, W]``); :class:`~wtours.video.loader.ClipLoader`
    makes whole batches from it with DataLoader workers, which is how training reads it.

    ``indexes`` (one :class:`~wtours.video.index.VideoIndex` per video: use these instead of indexing the
    files) with ``plan_only`` builds the clip plan without opening any file (``wtours bench decode``
    plans a 2-hour tour with it). Design knobs (keyword only): ``lanes`` (None: the batch size: places a batch draws from),
    ``min_segment_frames`` (120: frames decoded per seek at least), ``batch_size`` (None: 1; the
    batch size the clips are dealt for, so that a batch mixes ``lanes`` places and resume is exact),
    ``threads`` (None: decoder threads per worker = cores / workers), ``rank``/``world_size`` (None:
    from torch.distributed, else the RANK/WORLD_SIZE environment, else 0/1).
    """

    def __init__(self, videos: Sequence[str | Path], frames_per_clip: int = 8, stride: float = 60,
                 stride_unit: Literal["frames", "seconds"] = "frames", short_side: int = 256,
                 aspect: float = 16 / 9, clips_per_epoch: int = 1024, seed: int = 0,
                 backend: str = "pyav", *, lanes: int | None = None, min_segment_frames: int = 120,
                 batch_size: int | None = None, threads: int | None = None, rank: int | None = None,
                 world_size: int | None = None, indexes: Sequence[VideoIndex] | None = None,
                 plan_only: bool = False):
        super().__init__()
        if isinstance(videos, (str, Path)):
            videos = [videos]
        videos = [str(v) for v in videos]
        if not videos:
            raise UserError("ClipDataset needs at least one video")
        if backend not in BACKENDS:
            raise UserError(f"unknown video backend {backend!r} (choose from {', '.join(BACKENDS)})")
        for name, val in (("frames_per_clip", frames_per_clip), ("clips_per_epoch", clips_per_epoch),
                          ("short_side", short_side)):
            if int(val) < 1:
                raise UserError(f"{name} must be >= 1, got {val}")
        if not stride > 0:
            raise UserError(f"stride must be > 0, got {stride}")
        if not aspect > 0:
            raise UserError(f"aspect must be > 0, got {aspect}")
        for name, val in (("batch_size", batch_size), ("lanes", lanes)):
            if val is not None and int(val) < 1:
                raise UserError(f"{name} must be >= 1, got {val}")
        self.videos = videos
        self.frames_per_clip = int(frames_per_clip)
        self.stride, self.stride_unit = float(stride), stride_unit
        self.short_side, self.aspect = int(short_side), float(aspect)
        self.clips_per_epoch = int(clips_per_epoch)
        self.seed = int(seed)
        self.backend = backend
        self.lanes = None if lanes is None else int(lanes)
        self.min_segment_frames = int(min_segment_frames)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.threads = threads
        self._rank, self._world = rank, world_size
        self.out_h, self.out_w = clip_size(self.short_side, self.aspect)

        T = self.frames_per_clip
        self.indexes: list[VideoIndex] = []
        self.strides: list[int] = []
        self.valid_starts: list[int] = []
        self.blocks_per_segment: list[int] = []
        self.aligned: list[int] = []  # per video: its keyframe period when block starts can sit on keyframes
        for i, v in enumerate(videos):
            idx = indexes[i] if indexes is not None else index_video(v)
            s = stride_frames(idx, self.stride, stride_unit)
            span = (T - 1) * s + 1
            if idx.num_frames < span:
                raise VideoError(
                    f"too short for one clip: {idx.num_frames} frames, but a clip of {T} frames {s} apart "
                    f"spans {span} frames", path=v)
            self.indexes.append(idx)
            self.strides.append(s)
            self.valid_starts.append(idx.num_frames - span + 1)
            g = regular_gop(idx)
            self.aligned.append(g if g and s % g == 0 else 0)
            # a seek wastes ~GOP/2 frames unless blocks start on keyframes: then segments of >= SEGMENT_GOPS GOPs
            seg = self.min_segment_frames if self.aligned[-1] else max(self.min_segment_frames,
                                                                       SEGMENT_GOPS * idx.mean_keyframe_spacing)
            self.blocks_per_segment.append(max(1, math.ceil(seg / (s * T))))
        self._init_shared_state()
        self._cum_cycle: list[int] = [0]
        if plan_only:  # the clip plan of given indexes (what a loader would deliver), nothing to decode
            self._files, self._geoms, self.pixel_format = [], [], "yuv420p"
            self.matrices = np.full(len(videos), BT601, dtype=np.int64)
            return
        # fail early for streams the backend refuses (decord: AV1, HEVC with B-frames, ...)
        self._files = [open_video(v, backend, index=i) for v, i in zip(videos, self.indexes)]
        self._geoms = [make_geometry(i.width, i.height, self.short_side, self.aspect) for i in self.indexes]
        # frames travel as the decoder makes them (I420) and become RGB on the device (wtours.video.yuv),
        # except for decord (RGB only) and rotated footage (turned upright in RGB)
        yuv = backend == "pyav" and not any(i.orientation for i in self.indexes)
        self.pixel_format = "yuv420p" if yuv else "rgb24"
        if backend == "pyav":
            self._files = [LoaderVideo(v, i, pixel_format=self.pixel_format) for v, i in zip(videos, self.indexes)]
        self.matrices = np.array([stream_matrix(v) if yuv else BT601 for v in videos], dtype=np.int64)

    # -- public controls (set_epoch, set_start, position, rank_world, stats, ...: _EpochControls) --
    def count_delivered(self, row: int, clips: int) -> None:
        self._counters[row, 1] += int(clips) * self.frames_per_clip

    @property
    def slot_shape(self) -> tuple[int, ...]:
        """One clip as the loader ships it: ``(T, H * 3/2, W)`` I420 planes, or ``(T, H, W, 3)`` RGB."""
        if self.pixel_format == "yuv420p":
            return (self.frames_per_clip, self.out_h * 3 // 2, self.out_w)
        return (self.frames_per_clip, self.out_h, self.out_w, 3)

    def batch_fields(self, plan, items: np.ndarray, batch: torch.Tensor) -> dict:
        """The pixels of a loader batch: ``clip_yuv`` + ``yuv_matrix``, or ``clip_hwc``
        (:func:`wtours.video.loader.to_clip_chw` makes ``clip [B, T, 3, H, W]`` of either)."""
        if self.pixel_format == "yuv420p":
            return {"clip_yuv": batch, "yuv_matrix": torch.from_numpy(self.matrices[plan.video[items]])}
        return {"clip_hwc": batch}

    def to_rgb(self, clips: np.ndarray, video: int) -> torch.Tensor:
        """Slots ``[..., *slot_shape]`` of one video -> RGB ``uint8 [..., T, 3, H, W]`` (CPU)."""
        x = torch.from_numpy(np.ascontiguousarray(clips))
        if self.pixel_format == "yuv420p":
            return yuv420_to_rgb(x, int(self.matrices[video]))
        return x.movedim(-1, -3).contiguous()

    def window_frames(self) -> np.ndarray:
        """Per video: the frames of one clip window, ``T x stride`` (8 s at 8 frames 1 s apart)."""
        return np.asarray(self.strides, dtype=np.int64) * self.frames_per_clip

    # -- pickling ---------------------------------------------------------------------------------
    def __getstate__(self):
        return self._pickle_state("_cycle_cache", "_plan_cache")

    # -- the clip stream --------------------------------------------------------------------------
    def _video_blocks(self, v: int, cycle: int) -> tuple[np.ndarray, np.ndarray]:
        """Block bases and their numbers of valid starts for video ``v`` in ``cycle``."""
        s, T, V = self.strides[v], self.frames_per_clip, self.valid_starts[v]
        sT = s * T
        g = _rng(self.seed, 7919, v, cycle // T)
        u = int(g.integers(0, s))
        gop = self.aligned[v]
        if gop:  # keyframes every gop frames and gop | s: blocks start on keyframes (no frame decoded in vain)
            u = u // gop * gop
        k = int(g.permutation(T)[cycle % T])
        o = k * s + u
        j0 = -((o + s - 1) // sT)  # first block whose starts [base, base+s) reach 0
        j1 = (V - 1 - o) // sT
        bases = o + sT * np.arange(j0, j1 + 1, dtype=np.int64)
        counts = np.minimum(bases + s, V) - np.maximum(bases, 0)
        keep = counts > 0
        return bases[keep], counts[keep]

    def _cycle_size(self, cycle: int) -> int:
        return int(sum(int(self._video_blocks(v, cycle)[1].sum()) for v in range(len(self.videos))))

    def _cycle_clips(self, cycle: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All clips of ``cycle`` in stream order: (video, start, segment id) arrays."""
        cache = self.__dict__.setdefault("_cycle_cache", {})
        if cycle not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[cycle] = self._build_cycle(cycle)
        return cache[cycle]

    def _build_cycle(self, cycle: int):
        seg_video, seg_parts = [], []
        for v in range(len(self.videos)):
            bases, _ = self._video_blocks(v, cycle)
            M = self.blocks_per_segment[v]
            for a in range(0, len(bases), M):
                seg_video.append(v)
                seg_parts.append(bases[a: a + M])
        order = _rng(self.seed, 104729, cycle).permutation(len(seg_parts))
        vids, starts, segs = [], [], []
        for rank_in_cycle, si in enumerate(order.tolist()):
            v = seg_video[si]
            s, V = self.strides[v], self.valid_starts[v]
            st = (seg_parts[si][:, None] + np.arange(s)[None, :]).reshape(-1)
            st = st[(st >= 0) & (st < V)]
            st = st[_rng(self.seed, 2221, cycle, rank_in_cycle).permutation(st.size)]  # order within the segment
            vids.append(np.full(st.size, v, dtype=np.int64))
            starts.append(st.astype(np.int64))
            segs.append(np.full(st.size, (cycle << 24) + rank_in_cycle, dtype=np.int64))
        if not vids:
            e = np.zeros(0, dtype=np.int64)
            return e, e.copy(), e.copy()
        return np.concatenate(vids), np.concatenate(starts), np.concatenate(segs)

    def _stream_slice(self, lo: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Clips ``[lo, lo + n)`` of the endless clip stream."""
        cum = self._cum_cycle
        while cum[-1] <= lo:
            cum.append(cum[-1] + self._cycle_size(len(cum) - 1))
        c = int(np.searchsorted(np.asarray(cum), lo, side="right")) - 1
        parts, off, need = [], lo - cum[c], n
        while need > 0:
            v, st, sg = self._cycle_clips(c)
            take = min(need, v.size - off)
            parts.append((v[off: off + take], st[off: off + take], sg[off: off + take]))
            need -= take
            off = 0
            c += 1
            if len(cum) <= c:
                cum.append(cum[-1] + v.size)
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]

    def rank_clips(self, epoch: int, rank: int | None = None, world: int | None = None):
        """The clips of one rank in one epoch in canonical order (segments whole): (video, start, segment id)."""
        r, w = self.rank_world() if rank is None else (rank, world or 1)
        per = math.ceil(self.clips_per_epoch / w)
        return self._stream_slice(epoch * per * w + r * per, per)

    def sample_clips(self, epoch: int, rank: int | None = None, world: int | None = None,
                     batch_size: int | None = None):
        """The clip of every sample position of one rank's epoch: (video, start, segment id) arrays.

        Positions are dealt to ``lanes`` lanes (:func:`~wtours.video.loader.lane_order`), so the
        ``B`` clips of a batch come from ``min(lanes, B)`` different segments of the canonical order.
        """
        from wtours.video.loader import lane_order

        vids, starts, segs = self.rank_clips(epoch, rank, world)
        B = int(batch_size or self.batch_size or 1)
        q = lane_order(vids.size, B, self.lanes_for(B))
        return vids[q], starts[q], segs[q]

    def lanes_for(self, batch_size: int) -> int:
        """Places a batch of ``batch_size`` draws from: ``lanes``, else the batch size up to :data:`DEFAULT_LANES`."""
        return max(1, min(int(batch_size), self.lanes or DEFAULT_LANES))

    def loader_plan(self, epoch: int, start: int = 0, batch_size: int | None = None, end: int | None = None,
                    select: np.ndarray | None = None):
        """The :class:`~wtours.video.loader.TaskPlan` of this rank's epoch from ``start`` to ``end``:
        one decode task per segment (``select``: a bool mask over those positions to keep)."""
        from wtours.video.loader import make_plan

        r, w = self.rank_world()
        B = int(batch_size or self.batch_size or 1)
        key = (epoch, r, w, B, self.lanes)
        cache = self.__dict__.setdefault("_plan_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = self.sample_clips(epoch, r, w, B)
        vids, starts, segs = cache[key]
        end = vids.size if end is None else min(int(end), vids.size)
        pos = np.arange(min(int(start), end), end, dtype=np.int64)
        if select is not None:
            pos = pos[np.asarray(select, dtype=bool)]
        v, st = vids[pos], starts[pos]
        frames = st[:, None] + np.asarray(self.strides, np.int64)[v][:, None] * np.arange(self.frames_per_clip)[None, :]
        return make_plan(pos, v, st, frames, segs[pos])

    # -- decoding ---------------------------------------------------------------------------------
    def worker_setup(self, num_workers: int) -> None:
        """Decoder threads for one of ``num_workers`` workers (cores / workers unless ``threads``)."""
        threads = self.threads
        if threads is None:
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:
                cores = os.cpu_count() or 1
            threads = max(1, cores // max(1, num_workers))
        for f in self._files:
            f.threads = int(threads)

    def worker_close(self) -> None:
        for f in self._files:
            f.close()

    def run_task(self, plan, k: int, pool: np.ndarray, slots: np.ndarray, row: int = 0, stop=None) -> bool:
        """Decode task ``k`` of ``plan`` (one segment) into ``pool[slots]`` (``[n, T, H, W, 3]``, the
        task's clips in order). Every frame is decoded once, in one pass over the segment, and
        written where its clips want it. False when ``stop()`` said so (the pool is then partly written)."""
        items = plan.items(k)
        v = int(plan.video[items[0]])
        fidx = plan.frames[items]  # [n, T]
        flat = fidx.reshape(-1)
        order = np.argsort(flat, kind="stable")
        uniq, first = np.unique(flat[order], return_index=True)
        bounds = np.append(first, flat.size)
        T = self.frames_per_clip
        f, geom = self._files[v], self._geoms[v]
        before = dict(f.stats)
        ok = True
        write = getattr(f, "write", None) or _assign
        try:
            for u, (_, arr) in enumerate(f.iter_frames(uniq, geom)):
                for d in order[bounds[u]: bounds[u + 1]].tolist():
                    write(arr, pool[slots[d // T], d % T])
                if stop is not None and stop():
                    ok = False
                    break
        finally:
            c = self._counters[row]
            c[0] += f.stats["decoded_frames"] - before["decoded_frames"]
            c[2] += f.stats["corrupt_packets"] - before["corrupt_packets"]
            c[3] += f.stats["missing_frames"] - before["missing_frames"]
        return ok

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        """One item per clip in sample order. In DataLoader workers, positions are dealt in blocks of
        ``batch_size`` round-robin (a plain DataLoader then delivers them in sample order); each worker
        decodes every segment its positions need, so :class:`~wtours.video.loader.ClipLoader` is the
        efficient way to read it with workers."""
        from wtours.video.loader import run_inline

        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        row = 0 if info is None else 1 + (wid % (_MAX_STAT_ROWS - 1))
        epoch, start = self.position()
        B = self.batch_size or 1
        per = self.samples_per_rank
        select = None
        if nw > 1:
            select = ((np.arange(min(start, per), per) - start) // B) % nw == wid
        plan = self.loader_plan(epoch, start, B, per, select)
        if plan.positions.size == 0:
            return
        self.worker_setup(nw)
        try:
            for items, batch in run_inline(self, plan, B, False, row):
                for j, i in enumerate(items.tolist()):
                    yield {"clip": self.to_rgb(batch[j], int(plan.video[i])),
                           "video": int(plan.video[i]), "start": int(plan.start[i]),
                           "frames": torch.from_numpy(plan.frames[i].copy()), "sample": int(plan.positions[i])}
        finally:
            self.worker_close()
