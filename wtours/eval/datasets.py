"""Readers for the evaluation datasets: DAVIS-2017, YouTube-VOS (train split, TimeT's held-out
20 %), and the synthetic set ``wtours synth`` writes. Nothing is ever written into a dataset root
(the reference's loader re-encodes and *deletes* files it mistakes for videos).

A dataset is a list of :class:`Sequence` objects, each with a deterministic list of frames
(JPEG + PNG pairs). Labels:

- DAVIS (and synth): the raw per-video *instance* ids of the palette PNGs (0 = background,
  255 = void). D then pools "instance k" across videos, as TimeT does.
- YTVOS: instance ids mapped to *category* ids through ``meta.json`` with a lookup table
  (categories of the whole ``meta.json`` sorted alphabetically, numbered 1..N, 0 = background).
  The reference remaps in place, instance by instance, so a category id written earlier can be
  remapped again by a later instance (category 2 vs instance 2); the table cannot collide.

Frames per clip: ``frames_per_clip`` frames evenly spaced over the annotated frames
(``round(linspace(0, n-1, T))``, ``sampling="even"``, the default), or as TimeT draws them
(``sampling="random"``: ``T`` distinct random annotated frames, sorted; with replacement when a video has
fewer, seeded by ``(draw_seed, video position)``), or all of them for ``frames_per_clip = 0``; the list is
saved in the output (``frames.json``).

DAVIS annotations: ``<root>/<annotations>/480p`` with ``annotations="Annotations"`` (the DAVIS-2017
semi-supervised masks, default) or ``"Annotations_unsupervised"`` (DAVIS-2017 Unsupervised);
``Dataset.annotations`` records the folder used (relative to the root).

Every frame must have its annotation PNG and every PNG its frame (DAVIS and the YTVOS train split
annotate every frame they ship): a missing file is an error naming it, never a silently shorter
evaluation. ``missing="skip"`` (``--set missing_annotations=skip``) evaluates the pairs that exist
instead and counts what was left out (``Dataset.skipped``, printed and saved).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wtours.errors import UserError
from wtours.video.index import check_regular_file, file_kind

IMG_EXTS = (".jpg", ".jpeg", ".png")
MISSING = ("error", "skip")


@dataclass
class Sequence:
    """One video: ``frames`` / ``masks`` paths (selected, in order), a 256-entry label lookup
    table (raw PNG value -> evaluation label; -1 = unexpected; 255 = ignore) and its frame ids."""

    name: str
    frames: list[Path]
    masks: list[Path]
    lut: np.ndarray = field(repr=False)
    n_annotated: int = 0
    id_rule: str = ""

    @property
    def frame_ids(self) -> list[str]:
        return [p.stem for p in self.frames]


@dataclass
class Dataset:
    name: str
    root: Path
    sequences: list[Sequence]
    label_kind: str  # "instance" or "category"
    categories: list[str] | None = None
    split_note: str = ""
    skipped: dict[str, int] = field(default_factory=dict)  # video -> frames / masks without their pair
    annotations: str = ""  # the annotation folder read, relative to ``root`` (e.g. "Annotations/480p")

    @property
    def skip_note(self) -> str:
        if not self.skipped:
            return ""
        n = sum(self.skipped.values())
        return (f"skipped {n} frame(s) or annotation(s) without their pair in {len(self.skipped)} video(s) "
                f"(missing_annotations=skip): {', '.join(f'{k} ({v})' for k, v in list(self.skipped.items())[:5])}"
                + (" ..." if len(self.skipped) > 5 else ""))

    @property
    def n_frames(self) -> int:
        return sum(len(s.frames) for s in self.sequences)


SAMPLINGS = ("even", "random")


def select_frames(n: int, count: int, sampling: str = "even", rng: np.random.Generator | None = None) -> list[int]:
    """``count`` indices of ``range(n)``, sorted; all of them for ``count <= 0`` (the command line refuses
    negative counts).

    ``"even"``: deterministic, evenly spaced (all for ``count >= n``). ``"random"`` (TimeT's UNIFORM sampling):
    ``count`` distinct random indices from ``rng``, or drawn with replacement when ``n < count`` (so a clip
    always has ``count`` frames, some repeated, as the reference)."""
    if count <= 0:
        return list(range(n))
    if sampling == "random":
        if rng is None:
            raise ValueError("random frame sampling needs a generator")
        return sorted(int(i) for i in rng.choice(n, size=count, replace=n < count))
    if count >= n:
        return list(range(n))
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, count)})


def _frame_rng(draw_seed: int, position: int) -> np.random.Generator:
    return np.random.default_rng([int(draw_seed) & 0xFFFFFFFF, int(position)])


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"missing {what} (expected {path.name}{'/' if not path.suffix else ''})", path=path)
    return path


def read_video_list(path: str | Path) -> list[str]:
    """One video name per line; blank lines and ``#`` comments skipped. A name listed twice or one
    that is a path (``a/b``, ``..``) is an error."""
    p = check_regular_file(path, "video list")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read video list ({e})", path=p) from None
    names: list[str] = []
    seen: dict[str, int] = {}
    for i, ln in enumerate(lines, 1):
        n = ln.split("#", 1)[0].strip()
        if not n:
            continue
        if "/" in n or "\\" in n or n in (".", ".."):
            raise UserError(f"line {i}: {n!r} is not a video name (a folder name, not a path)", path=p)
        if n in seen:
            raise UserError(f"line {i}: video '{n}' is listed twice (first on line {seen[n]})", path=p)
        seen[n] = i
        names.append(n)
    if not names:
        raise UserError("video list is empty", path=p)
    return names


def _files(folder: Path, exts: tuple[str, ...], what: str) -> dict[str, Path]:
    """stem -> path of the files in ``folder`` with one of ``exts``; an entry with such a name that
    is not a regular file (a FIFO, a device, a folder, a broken link) is an error naming it."""
    out = {}
    for e in os.scandir(folder):
        if e.name.startswith(".") or not e.name.lower().endswith(exts):
            continue  # hidden files (macOS "._x.jpg" companions) are not frames
        path = folder / e.name
        try:
            regular = e.is_file()  # follows links; never opens the file
            mode = e.stat().st_mode
        except OSError:
            raise UserError(f"{what} cannot be read (a broken link?)", path=path) from None
        if not regular:
            kind = "a folder" if e.is_dir() else file_kind(mode)
            raise UserError(f"{what} is not a regular file ({kind})", path=path)
        out[Path(e.name).stem] = path
    return out


def _pairs(img_dir: Path, ann_dir: Path, name: str, missing: str = "error") -> tuple[list[Path], list[Path], int]:
    """Annotated frames of one video, sorted by name -> (frames, masks, pairs left out).

    Every frame needs a PNG of the same stem and every PNG a frame; with ``missing="skip"`` the
    unpaired ones are left out and counted instead."""
    if not img_dir.is_dir():
        raise UserError(f"video '{name}' has no frame folder", path=img_dir)
    if not ann_dir.is_dir():
        raise UserError(f"video '{name}' has no annotation folder", path=ann_dir)
    masks = _files(ann_dir, (".png",), "annotation")
    images = _files(img_dir, IMG_EXTS, "frame")
    no_mask = sorted(k for k in images if k not in masks)
    no_frame = sorted(k for k in masks if k not in images)
    if missing != "skip" and (no_mask or no_frame):
        count = (f"({len(no_mask)} frames without an annotation, {len(no_frame)} annotations without a frame; "
                 "evaluate the pairs that exist with --set missing_annotations=skip)")
        if no_mask:
            raise UserError(f"missing annotation: video '{name}' has frame {images[no_mask[0]].name} "
                            f"but no {no_mask[0]}.png {count}", path=ann_dir / f"{no_mask[0]}.png")
        raise UserError(f"annotation without its frame: video '{name}' has no {no_frame[0]}.jpg {count}",
                        path=masks[no_frame[0]])
    frames = sorted((images[k] for k in images if k in masks), key=lambda p: p.name)
    if not frames:
        raise UserError(f"video '{name}' has no frame with an annotation", path=ann_dir)
    return frames, [masks[p.stem] for p in frames], len(no_mask) + len(no_frame)


def _check_root(root: Path) -> Path:
    if not root.exists():
        raise UserError("dataset root not found", path=root)
    if not root.is_dir():
        raise UserError("dataset root is not a folder", path=root)
    return root


def _check_listed(videos: list[str], folder: Path, where: str) -> None:
    """Every listed video has its folder under ``folder``, or one line naming the first missing."""
    absent = [v for v in videos if not (folder / v).is_dir()]
    if absent:
        raise UserError(f"{len(absent)} of {len(videos)} listed videos are not in the dataset (first: "
                        f"'{absent[0]}', no folder {where}/{absent[0]}); check --videos / the video list",
                        path=folder)


def _instance_lut(max_id: int) -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int16)
    lut[: max_id + 1] = np.arange(max_id + 1)
    lut[255] = 255
    return lut


def read_davis(
    root: str | Path, videos: list[str] | None = None, frames_per_clip: int = 4, max_instance_id: int = 50,
    resolution: str = "480p", name: str = "davis", missing: str = "error", sampling: str = "even",
    draw_seed: int = 0, annotations: str = "Annotations",
) -> Dataset:
    """DAVIS-2017: ``JPEGImages/480p``, ``<annotations>/480p`` (``Annotations`` or ``Annotations_unsupervised``),
    ``ImageSets/2017/val.txt``."""
    root = _check_root(Path(root))
    img_root = _need(root / "JPEGImages" / resolution, f"DAVIS frame folder JPEGImages/{resolution}")
    ann_root = _need(root / annotations / resolution, f"DAVIS annotation folder {annotations}/{resolution}")
    if videos is None:
        videos = read_video_list(_need(root / "ImageSets" / "2017" / "val.txt", "DAVIS video list ImageSets/2017/val.txt"))
    if not videos:
        raise UserError("the video list is empty", path=root)
    _check_listed(videos, img_root, f"JPEGImages/{resolution}")
    lut = _instance_lut(max_instance_id)
    rule = f"instance ids must be 0..{max_instance_id} or 255 (void); change with --set max_instance_id=N"
    seqs, skipped = [], {}
    for pos, v in enumerate(videos):
        frames, masks, n_skip = _pairs(img_root / v, ann_root / v, v, missing)
        if n_skip:
            skipped[v] = n_skip
        sel = select_frames(len(frames), frames_per_clip, sampling, _frame_rng(draw_seed, pos))
        seqs.append(Sequence(v, [frames[i] for i in sel], [masks[i] for i in sel], lut, len(frames), rule))
    return Dataset(name, root, seqs, "instance", skipped=skipped, annotations=f"{annotations}/{resolution}")


def ytvos_categories(meta: dict) -> list[str]:
    """All category names of a YTVOS ``meta.json``, sorted alphabetically (id = position + 1)."""
    cats = set()
    for vid in meta.get("videos", {}).values():
        for obj in (vid.get("objects") or {}).values():
            if isinstance(obj, dict) and "category" in obj:
                cats.add(str(obj["category"]))
    return sorted(cats)


def ytvos_lut(objects: dict, cat_index: dict[str, int]) -> np.ndarray:
    """Lookup table raw instance id -> category id (0 bg, 255 ignore, -1 unknown instance)."""
    lut = np.full(256, -1, dtype=np.int16)
    lut[0] = 0
    lut[255] = 255
    for inst, obj in objects.items():
        i = int(inst)
        if not 0 < i < 255:
            raise ValueError(f"instance id {inst} out of range")
        lut[i] = cat_index[str(obj["category"])]
    return lut


def split_ytvos(names: list[str], fraction: float = 0.2, seed: int = 0) -> list[str]:
    """Deterministic held-out split: ``fraction`` of the sorted names, seeded shuffle."""
    names = sorted(names)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    n = max(1, int(round(fraction * len(names))))
    return sorted(names[i] for i in order[:n])


def read_ytvos(
    root: str | Path, videos: list[str] | None = None, frames_per_clip: int = 4, split_seed: int = 0,
    missing: str = "error", sampling: str = "even", draw_seed: int = 0,
) -> Dataset:
    """YouTube-VOS train layout: ``train/{JPEGImages,Annotations,meta.json}``.

    Videos: ``videos`` if given, else ``val.txt`` / ``valid.txt`` beside ``train/`` (TimeT_clean's
    695-video held-out list), else a deterministic seeded 20 % split of meta.json's videos
    (recorded in ``Dataset.split_note``). ``root`` may also be the ``train`` folder itself.
    """
    root = _check_root(Path(root))
    train = root / "train"
    if not train.is_dir() and (root / "meta.json").exists() and (root / "JPEGImages").is_dir():
        train, root = root, root.parent
    _need(train, "YTVOS folder train")
    img_root = _need(train / "JPEGImages", "YTVOS frame folder train/JPEGImages")
    ann_root = _need(train / "Annotations", "YTVOS annotation folder train/Annotations")
    meta_path = _need(train / "meta.json", "YTVOS train/meta.json")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        vids = meta["videos"]
        if not isinstance(vids, dict):
            raise TypeError("'videos' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"not a YTVOS meta.json ({type(e).__name__}: {e})", path=meta_path) from None
    cats = ytvos_categories(meta)
    cat_index = {c: i + 1 for i, c in enumerate(cats)}
    note = ""
    if videos is None:
        for cand in (root / "val.txt", root / "valid.txt"):
            if cand.is_file():
                videos = read_video_list(cand)
                note = f"videos from {cand}"
                break
    if videos is None:
        videos = split_ytvos(list(vids), 0.2, split_seed)
        note = (f"no val.txt beside train/: deterministic 20 % split of meta.json (seed {split_seed}, "
                f"{len(videos)} of {len(vids)} videos), NOT TimeT's list")
    if not videos:
        raise UserError("the video list is empty", path=root)
    absent = [v for v in videos if v not in vids]
    if absent:
        raise UserError(f"{len(absent)} of {len(videos)} listed videos are not in meta.json (first: '{absent[0]}'); "
                        "check --videos / the video list", path=meta_path)
    seqs, skipped = [], {}
    for pos, v in enumerate(videos):
        try:
            lut = ytvos_lut(vids[v].get("objects") or {}, cat_index)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"video '{v}': bad objects entry in meta.json ({e})", path=meta_path) from None
        frames, masks, n_skip = _pairs(img_root / v, ann_root / v, v, missing)
        if n_skip:
            skipped[v] = n_skip
        sel = select_frames(len(frames), frames_per_clip, sampling, _frame_rng(draw_seed, pos))
        rule = f"ids must be 0, 255 or an instance of '{v}' in meta.json ({sorted(int(i) for i in vids[v].get('objects') or {})})"
        seqs.append(Sequence(v, [frames[i] for i in sel], [masks[i] for i in sel], lut, len(frames), rule))
    return Dataset("ytvos", root, seqs, "category", cats, note, skipped,
                   annotations=str(ann_root.relative_to(root)))


def read_synth(root: str | Path, videos: list[str] | None = None, frames_per_clip: int = 4,
               max_instance_id: int = 50, missing: str = "error", sampling: str = "even", draw_seed: int = 0,
               annotations: str = "Annotations") -> Dataset:
    """The output folder of ``wtours synth``: its ``davis/`` subfolder in DAVIS-2017 layout."""
    root = _check_root(Path(root))
    davis = root / "davis" if (root / "davis").is_dir() else root
    if not (davis / "JPEGImages").exists():
        raise UserError("missing synthetic DAVIS folder (expected davis/ as written by 'wtours synth')", path=root / "davis")
    return read_davis(davis, videos, frames_per_clip, max_instance_id, name="synth", missing=missing,
                      sampling=sampling, draw_seed=draw_seed, annotations=annotations)


def read_dataset(kind: str, root: str | Path, videos_file: str | Path | None = None, frames_per_clip: int = 4,
                 max_instance_id: int = 50, split_seed: int = 0, missing: str = "error", sampling: str = "even",
                 draw_seed: int = 0, annotations: str = "Annotations") -> Dataset:
    """Dispatch on ``kind`` in {"davis", "ytvos", "synth"}; ``missing``: "error" or "skip" (frames
    without an annotation PNG and PNGs without a frame, see the module doc); ``sampling`` / ``draw_seed``:
    which frames (see the module doc); ``annotations``: the DAVIS (and synth) annotation folder."""
    if frames_per_clip < 0:
        raise UserError(f"frames_per_clip must be >= 0 (0 = every annotated frame), got {frames_per_clip}")
    if missing not in MISSING:
        raise UserError(f"missing_annotations must be one of {', '.join(MISSING)}, got {missing!r}")
    if sampling not in SAMPLINGS:
        raise UserError(f"frame_sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")
    videos = read_video_list(videos_file) if videos_file else None
    if kind == "davis":
        return read_davis(root, videos, frames_per_clip, max_instance_id, missing=missing, sampling=sampling,
                          draw_seed=draw_seed, annotations=annotations)
    if kind == "ytvos":
        return read_ytvos(root, videos, frames_per_clip, split_seed, missing, sampling, draw_seed)
    if kind == "synth":
        return read_synth(root, videos, frames_per_clip, max_instance_id, missing, sampling, draw_seed, annotations)
    raise UserError(f"unknown dataset '{kind}' (davis, ytvos or synth)")


def load_mask(path: Path, lut: np.ndarray, id_rule: str = "") -> np.ndarray:
    """Read a palette / grayscale PNG of ids and map it through ``lut`` -> uint8 [H, W].

    Raises :class:`UserError` for RGB masks or ids the lookup table does not know.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "1", "I", "I;16"):
                raise UserError(f"mask is {im.mode}, expected a palette or grayscale PNG of ids", path=path)
            arr = np.asarray(im)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise UserError(f"cannot read mask ({type(e).__name__}: {e})", path=path) from None
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError(f"mask has ids outside 0..255 (max {arr.max()})", path=path)
        arr = arr.astype(np.uint8)
    mapped = lut[arr]
    if (mapped < 0).any():
        bad = sorted(set(np.unique(arr[mapped < 0]).tolist()))
        raise UserError(f"mask has unexpected ids {bad[:8]}" + (f": {id_rule}" if id_rule else ""), path=path)
    return mapped.astype(np.uint8)
