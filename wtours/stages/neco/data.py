"""Stage-2 data: images from a folder, or frames sampled from the stage-1 videos, for NeCo.

CPU workers only decode and resize; crops and photometric augmentation run batched on the device
(:mod:`wtours.stages.neco.crops`). Every item is a uint8 canvas ``image [3, H, W]`` (edge-padded), its
valid size ``size [2]`` (``h, w``), and bookkeeping of unreadable files (``skipped``, ``bad``).

* :class:`ImageFolder`: every ``.jpg/.jpeg/.png/.webp`` under a folder, at any depth (COCO's
  ``train2017/`` works as is), sorted by path; each image is resized so its long side is
  ``data.image_size`` (aspect kept) and padded to a square canvas. A file that cannot be read is
  **skipped and counted**: the item is the next readable file, and ``skipped``/``bad`` say which
  file failed and why (the run logs the count and warns); a folder with no images, or whose sampled
  files are all unreadable, is refused up front.
* :class:`FrameCache`: ``data.frames`` frames spread over the ``--frames-from`` videos (in
  proportion to their length; evenly spaced or random), decoded **once** at short side
  ``data.frame_short_side`` into ``<stage2>/frames/frames.npy`` (a ``uint8 [N, H, W, 3]`` written with
  ordinary writes into a temp file renamed when complete, after checking the free space; read
  memory-mapped; temp files of a killed build are removed by the next) plus ``frames.json`` naming
  the videos, their size/mtime and the indices, and reused on resume while it matches.
* :class:`ResumableSampler`: an endless, seeded stream of indices (a fresh permutation per data
  epoch, sharded over ranks); its position is a pure function of the optimizer step
  (``consumed = global_step x accumulate x batch``), so a resumed run reads exactly the images the
  uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from wtours.errors import UserError
from wtours.fsutil import atomic_open, ensure_dir, remove_stale_temps, write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SKIP_TRIES = 32  # consecutive unreadable files tolerated before an item gives up


# ----------------------------------------------------------------------------- images


def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (any depth), sorted; one-line :class:`UserError` if none."""
    p = Path(root)
    if not p.exists():
        raise UserError("image folder not found", path=p)
    if not p.is_dir():
        raise UserError("not a folder (--images expects a folder of images)", path=p)
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise UserError(f"no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) found in this folder or below it",
                        path=p)
    return files


def canvas_from_array(arr: np.ndarray, canvas_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``uint8 [h, w, 3]`` -> (``uint8 [3, H, W]`` edge-padded canvas, ``size [2]`` = (h, w))."""
    h, w = arr.shape[:2]
    ch, cw = canvas_hw
    if (h, w) != (ch, cw):
        arr = np.pad(arr, ((0, ch - h), (0, cw - w), (0, 0)), mode="edge")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), torch.tensor([h, w], dtype=torch.int64)


def read_image(path: Path, long_side: int) -> np.ndarray:
    """Decode ``path`` as RGB with its long side resized to ``long_side`` -> ``uint8 [h, w, 3]``."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.draft("RGB", (long_side, long_side))  # JPEG: decode at a reduced scale when possible
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        f = long_side / max(w, h)
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(im, dtype=np.uint8)


class ImageFolder(Dataset):
    """Images under a folder as edge-padded square canvases (see the module docstring)."""

    def __init__(self, root: str | Path, image_size: int, check: int = 8) -> None:
        self.root = Path(root)
        self.files = list_images(self.root)
        self.image_size = int(image_size)
        self._check_some(check)

    def _check_some(self, count: int) -> None:
        """Refuse a folder whose first files (up to ``count``, spread over the list) are all unreadable."""
        picks = sorted({int(i) for i in np.linspace(0, len(self.files) - 1, min(count, len(self.files)))})
        errors = []
        for i in picks:
            try:
                read_image(self.files[i], 16)
                return
            except Exception as e:  # noqa: BLE001 - any decoder error means unreadable
                errors.append((self.files[i], e))
        f, e = errors[0]
        raise UserError(f"none of the {len(picks)} images tried can be read (e.g. {f.name}: "
                        f"{_reason(e)}); are these image files?", path=self.root)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        bad = ""
        for k in range(_SKIP_TRIES):
            f = self.files[(i + k) % len(self.files)]
            try:
                arr = read_image(f, self.image_size)
            except Exception as e:  # noqa: BLE001 - skipped and counted
                bad = bad or f"{f}: {_reason(e)}"
                continue
            image, size = canvas_from_array(arr, (self.image_size, self.image_size))
            return {"image": image, "size": size, "skipped": k, "bad": bad, "ok": True}
        image = torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)
        return {"image": image, "size": torch.tensor([self.image_size, self.image_size]), "skipped": _SKIP_TRIES,
                "bad": bad, "ok": False}


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())[:120]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ----------------------------------------------------------------------------- frames


def _video_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def plan_frames(lengths: Sequence[int], total: int, mode: str, seed: int) -> list[np.ndarray]:
    """Frame indices per video: ``total`` frames spread in proportion to ``lengths`` (at least one per
    video, at most all of its frames), evenly spaced or random (seeded), sorted."""
    lengths = [int(n) for n in lengths]
    share = np.array(lengths, dtype=np.float64) / max(1, sum(lengths))
    counts = np.maximum(1, np.floor(share * total)).astype(int)
    rest = total - counts.sum()
    for j in np.argsort(-(share * total - np.floor(share * total)))[:max(0, rest)]:
        counts[j] += 1
    counts = np.minimum(counts, lengths)
    rng = np.random.default_rng(seed)
    out = []
    for n, c in zip(lengths, counts):
        if mode == "random":
            out.append(np.sort(rng.choice(n, size=c, replace=False)))
        else:
            out.append(np.unique(np.round(np.linspace(0, n - 1, c)).astype(np.int64)))
    return out


def _remove_stale_cache_temps(out: Path) -> None:
    """Temp files of cache builds that were killed: ``atomic_open``'s (:func:`remove_stale_temps`) and the
    ``.frames.<pid>.npy.tmp`` of older wtours versions whose process is gone; one line says what was freed."""
    def old_cache_temp(p: Path) -> bool:  # .frames.<pid>.npy.tmp of a process that is gone
        parts = p.name.split(".")
        return (len(parts) == 5 and parts[:2] == ["", "frames"] and parts[3:] == ["npy", "tmp"]
                and parts[2].isdigit() and not _pid_alive(int(parts[2])))

    n, size = remove_stale_temps(out, also=old_cache_temp)
    if n:
        import sys

        print(f"wtours neco: removed {n} temp file(s) ({size / 2**20:.1f} MiB) left by a killed frame cache build "
              f"in {out}", file=sys.stderr)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_frame_cache(videos: Sequence[str], out_dir: str | Path, frames: int, short_side: int, mode: str,
                      seed: int, progress: bool = False, chunk: int = 64) -> Path:
    """Decode the frames of :func:`plan_frames` once into ``out_dir/frames.npy`` (+ ``frames.json``) ->
    the ``.npy`` path; an existing cache made from the same videos and settings is reused."""
    from wtours.video.decode import open_video

    out = ensure_dir(out_dir)
    _remove_stale_cache_temps(out)
    npy, meta_path = out / "frames.npy", out / "frames.json"
    paths = [Path(v) for v in videos]
    for p in paths:
        if not p.is_file():
            raise UserError("video not found" if not p.exists() else "not a file", path=p)
    want = {"videos": [_video_key(p) for p in paths], "frames": int(frames), "short_side": int(short_side),
            "mode": mode, "seed": int(seed)}
    if npy.is_file() and meta_path.is_file():
        try:
            have = json.loads(meta_path.read_text())
            if {k: have.get(k) for k in want} == want:
                np.load(npy, mmap_mode="r")
                return npy
        except (OSError, ValueError):
            pass
    opened = [open_video(p) for p in paths]
    plans = plan_frames([len(v) for v in opened], frames, mode, seed)
    geoms = [v.geometry(short_side) for v in opened]
    hh, ww = max(g.out_h for g in geoms), max(g.out_w for g in geoms)
    n = sum(len(p) for p in plans)
    sizes = np.zeros((n, 2), dtype=np.int64)
    need = n * hh * ww * 3 + 4096  # + the .npy header
    free = shutil.disk_usage(out).free
    if need > free:
        raise UserError(f"the frame cache needs {_size(need)} ({n} frames of {ww}x{hh}) but only {_size(free)} "
                        f"are free; free space, or lower data.frames ({frames}) or data.frame_short_side "
                        f"({short_side})", path=out)
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=n, desc="frame cache", unit="frame", file=sys.stderr, dynamic_ncols=True)
    try:
        # ordinary writes into a temp file (atomic_open: renamed when complete), not a memory map: a full disk
        # is then an OSError naming the file, not a SIGBUS, and a killed write leaves a temp file that the
        # next build removes (remove_stale_temps above)
        with atomic_open(npy, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                     "fortran_order": False, "shape": (n, hh, ww, 3)})
            k = 0
            for video, plan in zip(opened, plans):
                for s in range(0, len(plan), chunk):
                    got = video.get_frames(plan[s:s + chunk], short_side=short_side).numpy()  # [c, h, w, 3]
                    c, h, w = got.shape[:3]
                    if (h, w) != (hh, ww):
                        got = np.pad(got, ((0, 0), (0, hh - h), (0, ww - w), (0, 0)), mode="edge")
                    f.write(np.ascontiguousarray(got, dtype=np.uint8).tobytes())
                    sizes[k:k + c] = (h, w)
                    k += c
                    if bar is not None:
                        bar.update(c)
                video.close()
            if k != n:
                raise UserError(f"the frame cache got {k} frames, {n} planned", path=out)
    finally:
        if bar is not None:
            bar.close()
    with atomic_open(out / "sizes.npy", "wb") as f:
        np.save(f, sizes)
    write_json(meta_path, {**want, "count": n, "canvas": [hh, ww],
                           "indices": [p.tolist() for p in plans]})
    return npy


class FrameCache(Dataset):
    """Frames of a cache written by :func:`build_frame_cache` (memory-mapped, opened lazily per worker)."""

    def __init__(self, npy: str | Path) -> None:
        self.npy = Path(npy)
        self.sizes = np.load(self.npy.parent / "sizes.npy")
        self._arr: np.ndarray | None = None
        self.n = len(self.sizes)

    def _frames(self) -> np.ndarray:
        if self._arr is None:
            self._arr = np.load(self.npy, mmap_mode="r")
        return self._arr

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["_arr"] = None
        return d

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        a = self._frames()
        img = torch.from_numpy(np.ascontiguousarray(a[i].transpose(2, 0, 1)))
        return {"image": img, "size": torch.from_numpy(self.sizes[i].copy()), "skipped": 0, "bad": "", "ok": True}


# ----------------------------------------------------------------------------- order


class ResumableSampler(Sampler[int]):
    """Endless index stream: data epoch ``e`` is a permutation seeded by ``(seed, e)``, rank ``r`` of
    ``world`` takes every ``world``-th index (``n // world`` per epoch), starting ``start`` samples in."""

    def __init__(self, n: int, seed: int, start: int = 0, rank: int = 0, world: int = 1) -> None:
        if n < world:
            raise UserError(f"{n} images cannot be shared by {world} ranks")
        self.n, self.seed, self.start, self.rank, self.world = n, int(seed), int(start), rank, world
        self.per_rank = n // world

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) & ((1 << 63) - 1))
        return torch.randperm(self.n, generator=g)[self.rank::self.world][:self.per_rank]

    def __iter__(self) -> Iterator[int]:
        epoch, pos = divmod(self.start, self.per_rank)
        while True:
            idx = self.order(epoch)
            for i in idx[pos:].tolist():
                yield i
            epoch, pos = epoch + 1, 0


class NeCoDataModule(pl.LightningDataModule):
    """The run's dataset in the order of :class:`ResumableSampler` (positioned from ``global_step``)."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, prefetch_factor: int, seed: int,
                 accumulate: int = 1) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.prefetch_factor, self.seed, self.accumulate = prefetch_factor, seed, accumulate
        self.skipped_images = 0  # unreadable images skipped so far (in the checkpoint: state_dict)
        self.bad_examples: list[str] = []
        self._warn_at = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_images": self.skipped_images, "bad_examples": list(self.bad_examples)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_images = int(state_dict.get("skipped_images", 0))
        self.bad_examples = list(state_dict.get("bad_examples", []))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count unreadable images on the host (CPU tensors: no device sync) before the batch moves;
        warn when the count reaches 1, 10, 100, ...; refuse a batch with an item that found no readable
        image among the next files."""
        if not isinstance(batch, dict) or "skipped" not in batch:
            return batch
        skipped = int(batch["skipped"].sum())
        if skipped:
            self.skipped_images += skipped
            for bad in batch.get("bad", []):
                if bad and len(self.bad_examples) < 5 and bad not in self.bad_examples:
                    self.bad_examples.append(bad)
            example = self.bad_examples[0] if self.bad_examples else "?"
            if not bool(batch["ok"].all()):
                raise UserError(f"{self.skipped_images} unreadable images skipped and none readable among the next "
                                f"{_SKIP_TRIES} files (e.g. {example})")
            if self.skipped_images >= max(1, self._warn_at * 10):
                self._warn_at = max(1, self._warn_at * 10)
                import sys

                from tqdm import tqdm

                tqdm.write(f"warning: skipped {self.skipped_images} unreadable image(s) so far (e.g. {example}); "
                           "the run goes on", file=sys.stderr)
        return {"image": batch["image"], "size": batch["size"]}

    def consumed(self, global_step: int) -> int:
        """Samples this rank has consumed after ``global_step`` optimizer steps."""
        return int(global_step) * self.accumulate * self.batch_size

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        step = trainer.global_step if trainer is not None else 0
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        from wtours.video.clips import worker_context

        sampler = ResumableSampler(len(self.dataset), self.seed, self.consumed(step), rank, world)
        w = self.num_workers
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, num_workers=w, drop_last=True,
                          pin_memory=torch.cuda.is_available(), persistent_workers=w > 0,
                          prefetch_factor=self.prefetch_factor if w > 0 else None,
                          multiprocessing_context=worker_context(w))
