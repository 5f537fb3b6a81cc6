"""Training clips from folders of frames (YouTube-VOS ``JPEGImages/<video>/*.jpg``), like :class:`ClipDataset`.

:class:`FrameFolderClips` has the interface of :class:`wtours.video.clips.ClipDataset` (``set_epoch``,
``set_start``, ``rank_world``, ``samples_per_rank``, ``len``, ``stats``, ``reset_stats``,
``clip_shape``, picklable, shared-memory state) and yields the same items::

    {"clip": uint8 Tensor[T, 3, H, W], "video": int, "start": int, "frames": LongTensor[T], "sample": int}

where ``frames`` are the indices (in name order) of the files used, ``start = frames[0]`` and
``video`` indexes :attr:`FrameFolderClips.videos`.

Layout: under ``root`` the video folders are looked for in ``root/JPEGImages/<video>/``, then
``root/train/JPEGImages/<video>/`` (the YouTube-VOS download), then ``root/<video>/``; the first that
holds any frame is used. A video's frames are its ``*.jpg``/``*.jpeg``/``*.png`` files (any case,
hidden files ignored) in natural name order (digit runs compare as numbers, so ``2.jpg`` comes
before ``10.jpg``; for zero-padded names this is the plain name order).

Sampling (per clip of ``T = frames_per_clip`` frames from a video of ``n`` frames):

* ``"uniform"`` (TimeT's default): ``T`` distinct random frames, sorted; with replacement only when
  ``n < T``. Needs 1 frame.
* ``"dense"`` (TimeT_clean): ``T`` consecutive frames from a random start. Needs ``T`` frames.
* ``"stride"``: ``T`` frames ``stride`` apart from a random start, like the video loader. Needs
  ``(T - 1) * stride + 1`` frames. ``stride`` is ignored by the other two modes.

Video folders with fewer frames than a clip needs are skipped (:attr:`skipped_videos`, one log line).

Epochs: the clip stream is endless; epoch ``e`` is its slice ``[e*C', (e+1)*C')`` with
``C' = world * ceil(clips_per_epoch / world)`` and rank ``r`` takes the ``r``-th contiguous part, so
every rank gets the same number of clips. Clip ``q`` of the stream uses video ``perm_c[q mod V]``
where ``perm_c`` is a seeded permutation of the ``V`` videos for cycle ``c = q // V``: every video
is used equally often (to one clip) over an epoch and over any run of consecutive epochs. Its frames
come from a generator seeded by ``(seed, epoch, position in the epoch)``. So any sample can be
regenerated on its own (:meth:`FrameFolderClips.rank_clips` gives a whole rank's plan without
decoding), and the dataset is deterministic for ``(seed, epoch)`` and the world size; unlike
:class:`ClipDataset` (which shuffles inside each worker's decode groups), *which* clip a sample
position holds does not depend on the number of workers.

Resume: positions are dealt to DataLoader workers in blocks of ``batch_size`` in round-robin order,
as in :class:`ClipDataset`, so with the DataLoader's batch size samples are delivered in ``sample``
order and ``set_start(n)`` skips exactly the first ``n`` delivered samples.

Decoding (PIL): EXIF orientation applied (``ImageOps.exif_transpose``), ``convert("RGB")``, scaled
to *cover* ``clip_size(short_side, aspect)`` with the geometry of
:func:`wtours.video.decode.make_geometry` (the same sizes and crop offsets as the video loader) and
centre-cropped. The filter is ``Image.BILINEAR``: Pillow's bilinear widens its triangle kernel by the
scale factor when it shrinks, so it is anti-aliased (not the aliasing 2x2 bilinear of OpenCV), it is
what torchvision's PIL ``Resize`` (hence TimeT) uses, and it stays smooth when a small frame is
enlarged, where ``BOX`` would be blocky. With ``draft=True`` (default) a JPEG is first decoded at
1/2, 1/4 or 1/8 scale in libjpeg's DCT (``Image.draft``, never below the cover size) and a remaining
shrink of 3x or more starts with Pillow's box ``reduce`` (``reducing_gap=3``): for YouTube-VOS's
1280x720 frames to 456x256 this cuts the CPU per frame ~2.5x (13 -> 5 ms here) for a mean difference
of < 1 grey level from the exact path (``draft=False``).

An unreadable frame file is replaced by the nearest readable frame of the same video (``frames``
then names the file used), counted in ``stats()["bad_frames"]`` and logged once per file and
process; a video with no readable frame at all raises :class:`UserError` naming its folder when it
is first used.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from wtours.errors import UserError
from wtours.video.clips import _MAX_STAT_ROWS, _EpochControls, _rng
from wtours.video.decode import clip_size, make_geometry

log = logging.getLogger(__name__)

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUTS = ("JPEGImages", "train/JPEGImages", ".")  # folders under root that hold the video folders
SAMPLINGS = ("uniform", "dense", "stride")
_STATS = ("decoded_frames", "delivered_frames", "bad_frames")
_EXIF_ORIENTATION = 0x0112
_REDUCING_GAP = 3.0


def _natural_key(name: str):
    return [(0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def list_frames(folder: str | Path) -> list[str]:
    """The frame file names of one video folder (``*.jpg``/``*.jpeg``/``*.png``, not hidden), in order."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if not e.name.startswith(".")
                     and e.name.lower().endswith(FRAME_SUFFIXES) and e.is_file()]
    except OSError:
        return []
    return sorted(names, key=_natural_key)


def _subdirs(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return sorted((e.name for e in it if not e.name.startswith(".") and e.is_dir()), key=_natural_key)
    except OSError:
        return []


def find_frame_videos(root: str | Path) -> tuple[Path, dict[str, list[str]]]:
    """``(folder holding the video folders, {video: frame names})`` for the first layout with frames.

    Video folders without frames are included (with an empty list). Raises :class:`UserError` when
    ``root`` is missing or no layout holds a frame.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError("no such folder (expected video folders of JPEG frames)", path=root)
    for layout in LAYOUTS:
        base = root if layout == "." else root / layout
        if not base.is_dir():
            continue
        found = {name: list_frames(base / name) for name in _subdirs(base)}
        if any(found.values()):
            return base, found
    tried = ", ".join(f"{root}/{lay}/<video>/*.jpg" if lay != "." else f"{root}/<video>/*.jpg" for lay in LAYOUTS)
    hint = " (it holds frames itself: pass the folder above it)" if list_frames(root) else ""
    raise UserError(f"no JPEG frames under {root}{hint}; tried {tried}")


def read_video_list(videos: Sequence[str] | str | Path) -> list[str]:
    """Video names from a sequence, or from a list file (one name a line; blank and ``#`` lines skipped)."""
    if isinstance(videos, (str, Path)):
        p = Path(videos)
        try:
            text = p.read_text()
        except OSError as e:
            raise UserError(f"cannot read the video list file ({e.strerror or e}; a str or Path names a file of "
                            "video names, pass a list for names)", path=p) from None
        videos = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    names = [str(v).strip().rstrip("/") for v in videos]
    return list(dict.fromkeys(n for n in names if n))


class FrameFolderClips(_EpochControls, IterableDataset):
    """Sharded, deterministic, resumable clips from folders of frames (see the module doc).

    ``videos``: restrict to (and order by) these video names, or a list file of names (``str`` /
    ``Path``); a name with no folder raises :class:`UserError`. ``batch_size``: the DataLoader's batch
    size, for exact resume with workers. ``rank``/``world_size``: None = from torch.distributed, else
    RANK/WORLD_SIZE, else 0/1. ``draft``: fast JPEG decode at reduced DCT scale (see the module doc).
    """

    _STATS = _STATS

    def __init__(self, root: str | Path, frames_per_clip: int = 4, stride: int = 1, short_side: int = 256,
                 aspect: float = 16 / 9, clips_per_epoch: int = 1024, seed: int = 0, *,
                 sampling: Literal["uniform", "dense", "stride"] = "uniform",
                 videos: Sequence[str] | str | Path | None = None, batch_size: int | None = None,
                 rank: int | None = None, world_size: int | None = None, draft: bool = True):
        super().__init__()
        for name, val in (("frames_per_clip", frames_per_clip), ("clips_per_epoch", clips_per_epoch),
                          ("short_side", short_side)):
            if int(val) < 1:
                raise UserError(f"{name} must be >= 1, got {val}")
        if sampling not in SAMPLINGS:
            raise UserError(f"unknown clip sampling {sampling!r} (choose from {', '.join(SAMPLINGS)})")
        if not (float(stride) == int(stride) and int(stride) >= 1):
            raise UserError(f"stride must be a whole number of frames >= 1, got {stride}")
        if not aspect > 0:
            raise UserError(f"aspect must be > 0, got {aspect}")
        if batch_size is not None and int(batch_size) < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.root = Path(root)
        self.frames_per_clip = int(frames_per_clip)
        self.stride = int(stride)
        self.sampling = sampling
        self.short_side, self.aspect = int(short_side), float(aspect)
        self.clips_per_epoch = int(clips_per_epoch)
        self.seed = int(seed)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.draft = bool(draft)
        self._rank, self._world = rank, world_size
        self.out_h, self.out_w = clip_size(self.short_side, self.aspect)

        T = self.frames_per_clip
        self.min_frames = {"uniform": 1, "dense": T, "stride": (T - 1) * self.stride + 1}[sampling]
        base, found = find_frame_videos(self.root)
        self.frames_root = base
        names = list(found)
        if videos is not None:
            names = read_video_list(videos)
            missing = [n for n in names if n not in found]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise UserError(f"video {missing[0]!r} of the video list not found{more}", path=base)
            if not names:
                raise UserError("the video list is empty", path=videos if isinstance(videos, (str, Path)) else None)
        self.videos: list[str] = []
        self.frame_files: list[list[str]] = []
        skipped = []
        for n in names:
            if len(found[n]) >= self.min_frames:
                self.videos.append(n)
                self.frame_files.append(found[n])
            else:
                skipped.append(n)
        self.skipped_videos = len(skipped)
        need = f"{self.min_frames} frame{'s' if self.min_frames > 1 else ''}"
        if skipped:
            log.warning("%s: skipped %d of %d video folders with fewer than %s (%s sampling of %d frames), e.g. %s",
                        base, len(skipped), len(names), need, sampling, T, skipped[0])
        if not self.videos:
            longest = max((len(found[n]) for n in names), default=0)
            raise UserError(f"no video under {base} has the {need} a clip needs ({sampling} sampling of {T} "
                            f"frames; the longest has {longest})")
        log.info("%s: %d videos, %d frames", base, len(self.videos), sum(map(len, self.frame_files)))
        self._init_shared_state()  # shared between the main process and DataLoader workers

    # -- public controls (set_epoch, set_start, position, rank_world, stats, ...: _EpochControls) --
    def video_dir(self, v: int) -> Path:
        return self.frames_root / self.videos[v]

    # -- pickling ---------------------------------------------------------------------------------
    def __getstate__(self):
        return self._pickle_state("_perm_cache", "_bad", "_logged")

    # -- the clip plan ----------------------------------------------------------------------------
    def _video_at(self, q: int) -> int:
        """Video of clip ``q`` of the endless stream: a seeded shuffled cycle over the videos."""
        V = len(self.videos)
        c, i = divmod(q, V)
        cache = self.__dict__.setdefault("_perm_cache", {})
        if c not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[c] = _rng(self.seed, 4241, c).permutation(V)
        return int(cache[c][i])

    def _frames_for(self, v: int, g: np.random.Generator) -> np.ndarray:
        n, T = len(self.frame_files[v]), self.frames_per_clip
        if self.sampling == "uniform":
            return np.sort(g.choice(n, T, replace=n < T)).astype(np.int64)
        step = 1 if self.sampling == "dense" else self.stride
        s0 = int(g.integers(0, n - (T - 1) * step))
        return s0 + step * np.arange(T, dtype=np.int64)

    def clip_at(self, sample: int, epoch: int | None = None, rank: int | None = None,
                world: int | None = None) -> tuple[int, np.ndarray]:
        """``(video, file indices)`` of sample ``sample`` of a rank's epoch, without decoding."""
        epoch = self.epoch if epoch is None else int(epoch)
        r, w = self.rank_world() if rank is None else (int(rank), int(world or 1))
        per = math.ceil(self.clips_per_epoch / w)
        if not 0 <= sample < per:
            raise IndexError(f"sample {sample} out of range for {per} samples per rank")
        pos = r * per + int(sample)  # position in the epoch (all ranks)
        v = self._video_at(epoch * per * w + pos)
        return v, self._frames_for(v, _rng(self.seed, 6151, epoch, pos))

    def rank_clips(self, epoch: int, rank: int | None = None, world: int | None = None):
        """The plan of one rank's epoch in sample order: ``(videos int64[N], frames int64[N, T])``."""
        r, w = self.rank_world() if rank is None else (int(rank), int(world or 1))
        per = math.ceil(self.clips_per_epoch / w)
        plan = [self.clip_at(p, epoch, r, w) for p in range(per)]
        vids = np.array([v for v, _ in plan], dtype=np.int64)
        frames = np.stack([f for _, f in plan]) if plan else np.zeros((0, self.frames_per_clip), np.int64)
        return vids, frames

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        row = 0 if info is None else 1 + (wid % (_MAX_STAT_ROWS - 1))
        rank, world = self.rank_world()
        epoch, start = self.position()
        B = self.batch_size or 1
        slots = np.arange(start, self.samples_per_rank)
        slots = slots[((slots - start) // B) % nw == wid]
        for p in slots.tolist():
            yield self.get(p, epoch, rank, world, _row=row)

    def get(self, sample: int, epoch: int | None = None, rank: int | None = None, world: int | None = None,
            *, _row: int = 0) -> dict:
        """The item of sample ``sample`` (decoded here, in this process)."""
        v, idx = self.clip_at(sample, epoch, rank, world)
        clip, used = self._decode_clip(v, idx, _row)
        self._counters[_row, 1] += len(used)
        return {"clip": torch.from_numpy(clip), "video": v, "start": int(used[0]),
                "frames": torch.from_numpy(used), "sample": int(sample)}

    # -- decoding ---------------------------------------------------------------------------------
    def _decode_clip(self, v: int, idx: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray]:
        """``(uint8 [T, 3, H, W], file indices used)``; unreadable files replaced by the nearest readable."""
        out = np.empty((idx.size, 3, self.out_h, self.out_w), dtype=np.uint8)
        used = idx.copy()
        done: dict[int, np.ndarray] = {}
        for j, i in enumerate(idx.tolist()):
            k = self._nearest_readable(v, i, done, row)
            if k != i:
                self._counters[row, 2] += 1
            used[j] = k
            out[j] = done[k]
        return out, used

    def _nearest_readable(self, v: int, i: int, done: dict[int, np.ndarray], row: int) -> int:
        n = len(self.frame_files[v])
        bad = self.__dict__.setdefault("_bad", {}).setdefault(v, set())
        for d in range(n):
            for k in ((i,) if d == 0 else (i - d, i + d)):
                if not 0 <= k < n or k in bad:
                    continue
                if k in done:
                    return k
                arr = self._load(v, k)
                if arr is not None:
                    self._counters[row, 0] += 1
                    done[k] = arr.transpose(2, 0, 1)
                    return k
                bad.add(k)
        raise UserError(f"no readable frame among its {n} files", path=self.video_dir(v))

    def _load(self, v: int, k: int) -> np.ndarray | None:
        """One frame file at the output size, ``uint8 [H, W, 3]``; None (logged once) if unreadable."""
        path = self.video_dir(v) / self.frame_files[v][k]
        try:
            return load_frame(path, self.short_side, self.aspect, self.draft)
        except Exception as e:  # noqa: BLE001 - any failure to read or decode is a bad frame
            logged = self.__dict__.setdefault("_logged", set())
            if str(path) not in logged:
                logged.add(str(path))
                log.warning("%s: unreadable frame, using the nearest readable one (%s: %s)", path,
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None


def load_frame(path: str | Path, short_side: int, aspect: float, draft: bool = True) -> np.ndarray:
    """Decode one image upright (EXIF), RGB, scaled to cover ``clip_size(short_side, aspect)`` and
    centre-cropped: ``uint8 [H, W, 3]`` (see the module doc for the filter and ``draft``)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        turned = orientation in (5, 6, 7, 8)  # the stored image is the displayed one turned by 90 degrees
        w, h = im.size
        if turned:
            w, h = h, w
        g = make_geometry(w, h, short_side, aspect)
        if draft and im.format == "JPEG":
            im.draft("RGB", (g.scale_h, g.scale_w) if turned else (g.scale_w, g.scale_h))
        if orientation not in (None, 1):
            im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        im = im.resize((g.scale_w, g.scale_h), Image.BILINEAR, reducing_gap=_REDUCING_GAP if draft else None)
        arr = np.asarray(im)
    return np.ascontiguousarray(arr[g.crop_y: g.crop_y + g.out_h, g.crop_x: g.crop_x + g.out_w])
