"""Batches of training clips: decode tasks in DataLoader workers, batches assembled from a shared pool.

:class:`ClipLoader` turns a clip dataset (:class:`~wtours.video.clips.ClipDataset`, or
:class:`~wtours.video.frames.FrameFolderClips`) into batches::

    {"clip_yuv": uint8 Tensor[B, T, H * 3/2, W], "yuv_matrix": int64[B],      (or "clip_hwc": [B, T, H, W, 3])
     "video": int64[B], "start": int64[B], "frames": int64[B, T], "sample": int64[B]}

The pixels are what the decoder makes, I420 planes (:mod:`wtours.video.yuv`; RGB channels-last for
decord and rotated footage): the trainer turns them into the ``[B, T, 3, H, W]`` RGB clips of the
training step on the device (:func:`to_clip_chw`), so the CPU neither converts nor transposes a frame.

How a batch is made
-------------------
The dataset describes an epoch as a :class:`TaskPlan`: which clip each sample position holds, and
which *decode task* delivers it (for the video loader a task is one segment of consecutive frames,
decoded once, that yields many clips; positions that share a task are spread over many batches,
see :mod:`wtours.video.clips`). Tasks are numbered in the order in which batches first need them.

* The pool: one array of ``S`` clip slots ``[S, T, H, W, 3]`` in shared memory, allocated once
  (its pages are touched once and reused: on our VMs a first touch of fresh memory costs about
  as much as decoding a 360p frame, so nothing here allocates per frame or per batch).
* The main process assigns free slots to tasks, strictly in task order, and publishes the
  assignment in a small shared table. Worker ``w`` of ``n`` runs tasks ``w, w + n, ...``: it waits
  for its task's slots, decodes the task straight into them, and sends a message of a few bytes
  (no pixels travel through the DataLoader's queues).
* The main process gathers each batch from the slots into one output tensor (pinned when CUDA is
  available) and frees each slot as soon as its clip is copied out.

Slots are handed out in task order and a needed task only waits for clips that earlier tasks hold,
so the pool never deadlocks when it holds ``S_min`` clips: the largest number of clips that are
decoded but not yet delivered at any batch when every task is decoded just in time (computed from
the plan, :func:`held_clips`). ``S = S_min + lookahead`` with ``lookahead = workers x largest task``
lets every worker decode one task ahead; that bounds the memory: ``S x T x H x W x 3`` bytes in
``/dev/shm`` plus the batches in flight, whatever the consumer's speed.

Exactness: the plan is a function of the seed, the epoch, the rank, the world size and the batch
size only (not of the number of workers, nor of timing), so ``set_epoch``/``set_start`` resume
exactly, with any number of workers. A new ``iter()`` (a new epoch, a resume) bumps a generation
number in shared memory; workers still busy with an abandoned epoch stop within a frame.

With ``num_workers=0`` the same plan runs in the calling process (tasks decoded when first needed).

Why this design (issue 12), with the figures
--------------------------------------------
The goal was both diversity (the reference's random starts put 14-16 places of the tour in a batch of
16; our previous worker-local shuffle gave ~2.9) and decode efficiency (<= 1.5 decoded per delivered
frame; random starts cost ~60). Alternatives considered: a shuffle buffer per worker (diversity grows
only with its size, and each worker needs its own), random access on an intra-only proxy (large files,
and every frame still costs a seek). Chosen: segments decoded once, in one pass, by any worker, into
one pool shared by all workers, and batches drawn across *lanes*, far-apart parts of the epoch (see
:func:`lane_order`); a cached 540p proxy with a keyframe per second (``data.proxy: auto``) makes the
segments short (one 8-s block) and seeks free. ``wtours bench decode`` (synthetic 4K H.264 tour, 64 s,
30 fps, GOP 120; T = 8 frames 1 s apart, batches of 16, short side 540, 2 workers on the 2-core VM with
nothing else running, 2 runs, median)::

    input              ceiling/s  delivered/s  x ceiling (CPU)  decoded/deliv.  windows/batch (2 h plan)  pool
    4K source GOP 120     72.8        52.9      0.73    0.67         1.28         6.7/8  (15.9)          2.7 GiB
    540p proxy GOP 30    350.5       380.2      1.08    0.89         1.02         7.0/8  (15.9)          2.3 GiB

With other jobs on the machine the same rows gave 0.61x and 0.75x. The 64-s file has only 8 windows of
8 s; "2 h plan" counts them in the loader's plan of a 2-hour tour (:func:`wtours.bench.decode.planned_windows`).
The 4K row pays the 4K -> 540p scaling that the ceiling leaves out; segments of 5 keyframe intervals
there gave 1.15 decoded per delivered but a 7.6 GiB pool, so segments take 2. The proxy beats the
ceiling because two single-threaded workers use 2 cores better than one decoder's frame threads.

Memory is the price of decoding each frame once: a lane holds its segment until its clips are
delivered, so the pool is about ``lanes x segment`` frames (proxy: 16 x 240 frames x 0.78 MB at 540p
I420) plus one segment per worker; lower ``data.lanes`` to save it (a pool over 3/4 of the available
memory is refused with one line).
Not measured here: a GPU machine's 16 cores (no GPU was lent); there the proxy's ceiling scales with the
cores, against the ~2,200 frames/s an H100 at 30 % MFU consumes for ``dora_vits16``. Hardware decode
(NVDEC) is not used: PyAV's wheels ship FFmpeg without it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from wtours.errors import UserError, VideoError

_CTRL = 8  # generation, epoch, start, batch size, ... (shared int64 control block)
POLL_S = 0.002  # a waiting worker looks at the assignment table this often


# -- the plan ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskPlan:
    """One rank's epoch from a start position on: per delivered position ``i`` (ascending sample
    positions ``positions[i]``) its clip and its decode task; tasks numbered in order of first need."""

    positions: np.ndarray  # int64[N]
    video: np.ndarray  # int64[N]
    start: np.ndarray  # int64[N]
    frames: np.ndarray  # int64[N, T]
    task: np.ndarray  # int64[N] task of each position (0 .. K-1, in order of first need)
    task_ptr: np.ndarray  # int64[K + 1] items of task k: task_items[task_ptr[k]:task_ptr[k + 1]]
    task_items: np.ndarray  # int64[N] positions' indices grouped by task, ascending within a task
    epoch: int = 0

    @property
    def num_tasks(self) -> int:
        return int(self.task_ptr.size - 1)

    def items(self, k: int) -> np.ndarray:
        return self.task_items[self.task_ptr[k]: self.task_ptr[k + 1]]

    @property
    def task_sizes(self) -> np.ndarray:
        return np.diff(self.task_ptr)


def make_plan(positions: np.ndarray, video: np.ndarray, start: np.ndarray, frames: np.ndarray,
              group: np.ndarray) -> TaskPlan:
    """A :class:`TaskPlan` where positions with the same ``group`` key form one task."""
    positions = np.asarray(positions, dtype=np.int64)
    n = positions.size
    if n == 0:
        e = np.zeros(0, np.int64)
        return TaskPlan(e, e, e, np.zeros((0, frames.shape[1] if frames.ndim == 2 else 0), np.int64), e,
                        np.zeros(1, np.int64), e)
    _, first, inv = np.unique(group, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # task ids by first need
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    task = rank[inv.reshape(-1)].astype(np.int64)
    items = np.argsort(task, kind="stable").astype(np.int64)
    ptr = np.concatenate([[0], np.cumsum(np.bincount(task, minlength=order.size))]).astype(np.int64)
    return TaskPlan(positions, np.asarray(video, np.int64), np.asarray(start, np.int64),
                    np.asarray(frames, np.int64), task, ptr, items)


def lane_order(n: int, batch_size: int, lanes: int) -> np.ndarray:
    """Which clip of the canonical order each sample position holds: ``int64[n]``.

    Sample positions form batches of ``batch_size``; column ``j`` of a batch belongs to lane
    ``j mod lanes``. The canonical order (clips of one segment together) is cut into ``lanes``
    contiguous parts, one per lane, and each lane takes its part one clip per column per batch:
    even lanes forwards, odd lanes backwards. So the clips of a batch come from ``lanes`` places
    that are a whole part apart, and a segment cut by a part boundary is used by its two lanes at
    the same time (both at the start or both at the end of the epoch), so it is decoded once.
    """
    n, batch_size = int(n), max(1, int(batch_size))
    lanes = max(1, min(int(lanes), batch_size))
    p = np.arange(n, dtype=np.int64)
    lane = (p % batch_size) % lanes
    counts = np.bincount(lane, minlength=lanes)
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    grouped = np.argsort(lane, kind="stable")  # positions by lane, ascending within a lane
    k = np.empty(n, dtype=np.int64)
    k[grouped] = np.arange(n, dtype=np.int64) - first[lane[grouped]]
    return np.where(lane % 2 == 0, first[lane] + k, first[lane + 1] - 1 - k)


def held_clips(plan: TaskPlan, batch_size: int) -> int:
    """Most clips decoded and not yet delivered at any batch when each task is decoded when first needed."""
    n = plan.positions.size
    if n == 0:
        return 0
    b = np.arange(n, dtype=np.int64) // max(1, int(batch_size))
    need = b[plan.task_items[plan.task_ptr[:-1]]]  # first (smallest) item of each task
    diff = np.zeros(int(b[-1]) + 2, dtype=np.int64)
    np.add.at(diff, need[plan.task], 1)
    np.add.at(diff, b + 1, -1)
    return int(np.cumsum(diff).max())


def distinct_windows(video: np.ndarray, start: np.ndarray, window: np.ndarray | int) -> int:
    """Distinct ``(video, start // window)`` among a batch's clips (``window`` in frames, per clip or one)."""
    w = np.maximum(1, np.asarray(window, dtype=np.int64))
    return int(np.unique(np.stack([np.asarray(video, np.int64), np.asarray(start, np.int64) // w], 1), axis=0).shape[0])


# -- batches from a pool --------------------------------------------------------------------------


class _OutBuffers:
    """Output tensors for batches, reused once the consumer dropped every reference (CPU), or pinned
    blocks from torch's caching host allocator (CUDA): either way no fresh pages per batch."""

    def __init__(self, shape_tail: tuple[int, ...], pin: bool, keep: int = 6):
        self.tail, self.pin, self.keep = tuple(shape_tail), pin, keep
        self.bufs: list[torch.Tensor] = []

    def get(self, n: int) -> torch.Tensor:
        if self.pin:
            return torch.empty((n, *self.tail), dtype=torch.uint8, pin_memory=True)
        for buf in self.bufs:
            # our list, the loop variable and getrefcount's argument: nobody else holds it (views hold _base)
            if buf.shape[0] >= n and sys.getrefcount(buf) <= 3:
                return buf[:n] if buf.shape[0] > n else buf
        buf = torch.empty((n, *self.tail), dtype=torch.uint8)
        if len(self.bufs) < self.keep:
            self.bufs.append(buf)
        return buf


class _Assigner:
    """Slot bookkeeping of the main process: tasks get slots strictly in task order."""

    def __init__(self, plan: TaskPlan, slots: int):
        self.plan = plan
        self.free = list(range(slots - 1, -1, -1))  # a stack: low slots first, so few pages are ever touched
        self.slot_of = np.full(plan.positions.size, -1, dtype=np.int64)
        self.next = 0  # next task to assign

    def can_assign(self) -> bool:
        return self.next < self.plan.num_tasks and len(self.free) >= int(self.plan.task_sizes[self.next])

    def assign(self) -> tuple[int, np.ndarray]:
        k = self.next
        items = self.plan.items(k)
        if len(self.free) < items.size:
            raise RuntimeError(f"clip pool too small: task {k} needs {items.size} slots, {len(self.free)} free")
        got = np.array([self.free.pop() for _ in range(items.size)], dtype=np.int64)
        self.slot_of[items] = got
        self.next += 1
        return k, got

    def release(self, items: np.ndarray) -> None:
        s = self.slot_of[items]
        self.slot_of[items] = -1
        self.free.extend(int(x) for x in s[::-1].tolist())


def _batches(plan: TaskPlan, batch_size: int, drop_last: bool, pool: np.ndarray, asg: _Assigner,
             ensure: Callable[[int], None], out: _OutBuffers | None,
             delivered: Callable[[int], None]) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield ``(items, batch)``: ``batch`` uint8 ``[n, T, H, W, 3]`` gathered from the pool."""
    n = plan.positions.size
    nb = n // batch_size if drop_last else math.ceil(n / batch_size)
    for b in range(nb):
        items = np.arange(b * batch_size, min(n, (b + 1) * batch_size), dtype=np.int64)
        ensure(int(plan.task[items].max()))
        slots = asg.slot_of[items]
        if out is None:
            batch = pool[slots]  # fancy indexing: a copy
        else:
            batch = out.get(items.size)
            dst = batch.numpy()
            for j, s in enumerate(slots.tolist()):
                dst[j] = pool[s]
        asg.release(items)
        delivered(int(items.size))
        yield items, batch


def run_inline(source: Any, plan: TaskPlan, batch_size: int, drop_last: bool = False, row: int = 0,
               out: _OutBuffers | None = None, pool: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, Any]]:
    """The plan in this process: each task decoded when a batch first needs it (a pool of ``S_min`` clips,
    or ``pool`` when it is large enough)."""
    shape = source.slot_shape
    size = max(1, held_clips(plan, batch_size))
    if pool is None or pool.shape[0] < size or tuple(pool.shape[1:]) != tuple(shape):
        pool = np.empty((size, *shape), dtype=np.uint8)
    asg = _Assigner(plan, pool.shape[0])

    def ensure(k: int) -> None:
        while asg.next <= k:
            t, slots = asg.assign()
            source.run_task(plan, t, pool, slots, row)

    yield from _batches(plan, batch_size, drop_last, pool, asg, ensure, out, lambda m: source.count_delivered(row, m))


# -- workers ----------------------------------------------------------------------------------------


class _TaskStream(IterableDataset):
    """What the DataLoader's workers iterate: run this worker's tasks into the shared pool."""

    def __init__(self, source: Any, pool: torch.Tensor, ctrl: torch.Tensor, table: torch.Tensor,
                 tags: torch.Tensor, lock: Any):
        super().__init__()
        self.source, self.pool, self.ctrl, self.table, self.tags, self.lock = source, pool, ctrl, table, tags, lock

    def _slots(self, k: int, gen: int) -> np.ndarray | None:
        """Wait for task ``k``'s slots; None when the main process started another iteration."""
        ring = self.tags.shape[0]
        tag = (gen << 32) | k
        while True:
            with self.lock:
                if int(self.ctrl[0]) != gen:
                    return None
                if int(self.tags[k % ring]) == tag:
                    n = int(self.table[k % ring, 0])
                    return self.table[k % ring, 1: 1 + n].numpy().astype(np.int64)
            time.sleep(POLL_S)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        row = 1 + wid
        with self.lock:
            gen, epoch, start, bs, end = (int(x) for x in self.ctrl[:5].tolist())
        src = self.source
        src.worker_setup(nw)
        if not getattr(self, "_populated", False):  # once per worker process (persistent workers keep it)
            self._populated = populate(self.pool)
        plan = src.loader_plan(epoch, start, bs, end)
        pool = self.pool.numpy()

        def stop() -> bool:
            return int(self.ctrl[0]) != gen

        try:
            for k in range(wid, plan.num_tasks, nw):
                slots = self._slots(k, gen)
                if slots is None:
                    return
                try:
                    ok = src.run_task(plan, k, pool, slots, row, stop)
                except UserError as e:  # one line for the user, raised again in the main process
                    yield {"gen": gen, "task": k, "error": str(e), "kind": type(e).__name__}
                    return
                if ok is False or stop():
                    return
                yield {"gen": gen, "task": k}
        finally:
            src.worker_close()


MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def populate(t: torch.Tensor) -> bool:
    """Map ``t``'s pages into this process's page table now, without changing them (``madvise``
    ``MADV_POPULATE_WRITE``): a worker's first write to each page of the shared pool otherwise takes a
    page fault (~1.5 us per 4 KiB page here: ~1 s per GiB per worker). False where unsupported."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        ptr = t.data_ptr()
        lo = ptr // page * page
        n = (ptr + t.numel() * t.element_size() - lo + page - 1) // page * page
        return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(n), MADV_POPULATE_WRITE) == 0
    except (OSError, AttributeError):
        return False


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def shm_free_bytes(path: str = "/dev/shm") -> int | None:
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def mem_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class ClipLoader:
    """Batches of a clip dataset (see the module docstring). An iterable for Lightning's ``fit``.

    ``dataset`` provides ``loader_plan(epoch, start, batch_size, end)``, ``run_task``,
    ``slot_shape``, ``position()`` (epoch, start), ``samples_per_rank``. ``lookahead`` (clips;
    default: ``num_workers`` x the largest task) is the pool beyond its deadlock-free minimum.
    """

    def __init__(self, dataset: Any, batch_size: int, num_workers: int = 0, *, drop_last: bool = True,
                 pin_memory: bool | None = None, prefetch_factor: int = 4, lookahead: int | None = None,
                 multiprocessing_context: str | None = "forkserver", persistent_workers: bool = True):
        if int(batch_size) < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise UserError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.drop_last = bool(drop_last)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.prefetch_factor = max(1, int(prefetch_factor))
        self.context = multiprocessing_context
        self.persistent = bool(persistent_workers)
        if getattr(dataset, "batch_size", None) in (None, self.batch_size):
            dataset.batch_size = self.batch_size
        else:
            raise UserError(f"the dataset deals batches of {dataset.batch_size} clips, the loader makes batches of "
                            f"{self.batch_size}: give both the same batch size")
        self._lookahead = lookahead
        self._shared: dict[str, Any] | None = None
        self._dl = None
        self._out = _OutBuffers(dataset.slot_shape, self.pin_memory)
        self._inline_pool: np.ndarray | None = None
        self.pool_clips = 0

    # -- sizes --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        n = int(self.dataset.samples_per_rank)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _end(self, start: int = 0) -> int:
        """End of the delivered positions: with ``drop_last``, whole batches from ``start`` on."""
        n = int(self.dataset.samples_per_rank)
        start = min(int(start), n)
        return start + (n - start) // self.batch_size * self.batch_size if self.drop_last else n

    def pool_size(self, plan: TaskPlan) -> int:
        """Slots for ``plan``: its deadlock-free minimum plus the lookahead."""
        sizes = plan.task_sizes
        biggest = int(sizes.max()) if sizes.size else 1
        ahead = self._lookahead if self._lookahead is not None else self.num_workers * biggest
        return max(1, held_clips(plan, self.batch_size)) + int(ahead)

    @property
    def clip_bytes(self) -> int:
        return int(np.prod(self.dataset.slot_shape))

    # -- shared state ---------------------------------------------------------------------------------
    def _setup(self, plan: TaskPlan) -> None:
        import multiprocessing as mp

        need = self.pool_size(plan)
        if self._shared is not None and need <= self._shared["pool"].shape[0]:
            return
        self.close()
        # a later epoch may need a little more: room for 25 % more than this one
        size = need + max(0, held_clips(plan, self.batch_size)) // 4
        nbytes = size * self.clip_bytes
        free, avail = shm_free_bytes(), mem_available_bytes()
        fix = "lower data.lanes, data.num_workers or data.short_side, or train on a proxy (data.proxy: auto)"
        if free is not None and nbytes > free:
            raise UserError(
                f"the clip pool needs {nbytes / 2**30:.1f} GiB of shared memory and /dev/shm has "
                f"{free / 2**30:.1f} GiB free: {fix}, or give the container more (docker run --shm-size)")
        if avail is not None and nbytes > 0.75 * avail:
            raise UserError(f"the clip pool needs {nbytes / 2**30:.1f} GiB and this machine has "
                            f"{avail / 2**30:.1f} GiB of memory available (the pool may take 3/4 of it): {fix}")
        biggest = int(plan.task_sizes.max()) if plan.num_tasks else 1
        ring = 4 * self.num_workers + 16
        pool = torch.empty((size, *self.dataset.slot_shape), dtype=torch.uint8).share_memory_()
        pool.zero_()  # touch every page now, once (not in the first epoch's timing; fails early if /dev/shm is short)
        ctrl = torch.zeros(_CTRL, dtype=torch.int64).share_memory_()
        table = torch.zeros((ring, 1 + max(biggest * 2, 1)), dtype=torch.int32).share_memory_()
        tags = torch.full((ring,), -1, dtype=torch.int64).share_memory_()
        lock = mp.get_context(self.context).Lock() if self.context else mp.Lock()
        self._shared = {"pool": pool, "ctrl": ctrl, "table": table, "tags": tags, "lock": lock}
        self.pool_clips = size

    def close(self) -> None:
        """Stop the workers and free the pool (a later ``iter()`` starts them again)."""
        dl, self._dl = self._dl, None
        if dl is not None and getattr(dl, "_iterator", None) is not None:
            it = dl._iterator
            dl._iterator = None
            try:
                it._shutdown_workers()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self._shared = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_dl"] = None
        d["_shared"] = None
        d["_inline_pool"] = None
        return d

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        ds = self.dataset
        epoch, start = ds.position()
        end = self._end(start)
        plan = ds.loader_plan(epoch, start, self.batch_size, end)
        if self.num_workers == 0:
            need = max(1, held_clips(plan, self.batch_size))
            if self._inline_pool is None or self._inline_pool.shape[0] < need:  # kept: its pages are touched once
                self._inline_pool = np.zeros((need + need // 4, *ds.slot_shape), dtype=np.uint8)
            self.pool_clips = self._inline_pool.shape[0]
            for items, batch in run_inline(ds, plan, self.batch_size, self.drop_last, 0, self._out, self._inline_pool):
                yield self._pack(plan, items, batch)
            return
        if self._shared is None or start > 0:  # size the pool for the whole epoch (a resume needs no more)
            self._setup(ds.loader_plan(epoch, 0, self.batch_size, self._end(0)))
        else:
            self._setup(plan)
        yield from self._iter_workers(plan, epoch, start, end)

    def _pack(self, plan: TaskPlan, items: np.ndarray, batch: torch.Tensor) -> dict:
        out = self.dataset.batch_fields(plan, items, batch)
        out.update({"video": torch.from_numpy(plan.video[items]), "start": torch.from_numpy(plan.start[items]),
                    "frames": torch.from_numpy(plan.frames[items]), "sample": torch.from_numpy(plan.positions[items])})
        return out

    def _iter_workers(self, plan: TaskPlan, epoch: int, start: int, end: int) -> Iterator[dict]:
        from torch.utils.data import DataLoader

        sh = self._shared
        assert sh is not None
        ctrl, table, tags, lock = sh["ctrl"], sh["table"], sh["tags"], sh["lock"]
        with lock:
            gen = int(ctrl[0]) + 1
            ctrl[:5] = torch.tensor([gen, epoch, start, self.batch_size, end])
        if self._dl is None:
            stream = _TaskStream(self.dataset, sh["pool"], ctrl, table, tags, lock)
            self._dl = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                  persistent_workers=self.persistent, prefetch_factor=self.prefetch_factor,
                                  multiprocessing_context=self.context)
        pool = sh["pool"].numpy()
        size = pool.shape[0]
        asg = _Assigner(plan, size)
        ring = tags.shape[0]
        received = np.zeros(plan.num_tasks, dtype=bool)
        lowest_missing = [0]  # every task below it has been received

        def publish() -> None:
            # assign tasks in order while slots are free and the ring has room
            while asg.can_assign() and asg.next - lowest_missing[0] < ring:
                k, slots = asg.assign()
                with lock:
                    table[k % ring, 0] = slots.size
                    table[k % ring, 1: 1 + slots.size] = torch.from_numpy(slots.astype(np.int32))
                    tags[k % ring] = (gen << 32) | k

        it = iter(self._dl)

        def ensure(k: int) -> None:
            while asg.next <= k:  # the tasks this batch needs must get slots now (always possible, see above)
                before = asg.next
                publish()
                if asg.next == before:
                    raise RuntimeError(f"clip pool of {size} slots too small for task {asg.next}")
            while not received[: k + 1].all():
                try:
                    msg = next(it)
                except StopIteration:
                    raise RuntimeError("the loader's workers stopped before delivering every task") from None
                if msg.get("gen") != gen:
                    continue
                if "error" in msg:
                    cls = VideoError if msg.get("kind") == "VideoError" else UserError
                    raise cls(msg["error"])
                received[int(msg["task"])] = True
                while lowest_missing[0] < received.size and received[lowest_missing[0]]:
                    lowest_missing[0] += 1
                publish()

        ds = self.dataset
        for items, batch in _batches(plan, self.batch_size, self.drop_last, pool, asg, ensure, self._out,
                                     lambda m: ds.count_delivered(0, m)):
            publish()
            yield self._pack(plan, items, batch)
        for msg in it:  # every task was delivered: collect the workers' end of iteration (they are idle then)
            if msg.get("gen") == gen and "error" in msg:
                raise (VideoError if msg.get("kind") == "VideoError" else UserError)(msg["error"])


class FrameFolderTasks:
    """:class:`~wtours.video.frames.FrameFolderClips` as a loader source: one task per batch (its
    clips are independent random reads), clips shipped channels-last like the video loader's RGB."""

    pixel_format = "rgb24"

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __getattr__(self, name: str) -> Any:  # everything else (clips_per_epoch, stats, set_epoch, ...) is the dataset's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    @property
    def batch_size(self) -> int | None:
        return self.dataset.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.dataset.batch_size = value

    @property
    def slot_shape(self) -> tuple[int, ...]:
        t, c, h, w = self.dataset.clip_shape
        return (t, h, w, c)

    def position(self) -> tuple[int, int]:
        st = self.dataset._state
        epoch = int(st[0])
        return epoch, (int(st[1]) if int(st[2]) == epoch else 0)

    def loader_plan(self, epoch: int, start: int = 0, batch_size: int | None = None, end: int | None = None):
        ds = self.dataset
        r, w = ds.rank_world()
        B = int(batch_size or ds.batch_size or 1)
        vids, frames = ds.rank_clips(epoch, r, w)
        end = vids.size if end is None else min(int(end), vids.size)
        pos = np.arange(min(int(start), end), end, dtype=np.int64)
        batch_of = (pos - (pos[0] if pos.size else 0)) // B  # one task per batch
        plan = make_plan(pos, vids[pos], frames[pos, 0] if pos.size else pos, frames[pos], batch_of)
        plan.epoch = int(epoch)
        return plan

    def run_task(self, plan: TaskPlan, k: int, pool: np.ndarray, slots: np.ndarray, row: int = 0, stop=None) -> bool:
        ds = self.dataset
        r, w = ds.rank_world()
        for i, s in zip(plan.items(k).tolist(), slots.tolist()):
            item = ds.get(int(plan.positions[i]), plan.epoch, r, w, _row=row)  # counts its own frames
            pool[s] = item["clip"].numpy().transpose(0, 2, 3, 1)
            if stop is not None and stop():
                return False
        return True

    def count_delivered(self, row: int, clips: int) -> None:
        pass  # FrameFolderClips.get counted them

    def batch_fields(self, plan: TaskPlan, items: np.ndarray, batch: torch.Tensor) -> dict:
        return {"clip_hwc": batch}

    def worker_setup(self, num_workers: int) -> None:
        pass

    def worker_close(self) -> None:
        pass

    def __getstate__(self):
        return {"dataset": self.dataset}

    def __setstate__(self, d):
        self.dataset = d["dataset"]


def loader_source(dataset: Any) -> Any:
    """``dataset`` itself when it plans decode tasks (:class:`~wtours.video.clips.ClipDataset`), else
    an adapter (:class:`FrameFolderTasks`)."""
    return dataset if hasattr(dataset, "loader_plan") else FrameFolderTasks(dataset)


def to_clip_chw(batch: dict) -> dict:
    """A loader batch -> ``clip [B, T, 3, H, W]`` uint8 on the batch's device: I420 ``clip_yuv``
    converted (:func:`wtours.video.yuv.yuv420_to_rgb`, matrix per clip), or ``clip_hwc`` transposed."""
    if "clip_yuv" in batch:
        from wtours.video.yuv import yuv420_to_rgb

        batch = dict(batch)
        batch["clip"] = yuv420_to_rgb(batch.pop("clip_yuv"), batch.pop("yuv_matrix"))
    elif "clip_hwc" in batch:
        batch = dict(batch)
        batch["clip"] = batch.pop("clip_hwc").permute(0, 1, 4, 2, 3).contiguous()
    return batch
