"""Train / held-out splits of a category-labelled set, for the instruments that learn from labelled
frames (in-context retrieval's memory, the linear probe's training set) and score on others.

Sets (YouTube-VOS train layout: ``train/{JPEGImages,Annotations,meta.json}``; labels are categories of
``meta.json``, numbered alphabetically 1..N, 0 = background, see :mod:`wtours.eval.datasets`):

- ``--dataset ytvos --root R``: R itself; ``--dataset synth --root R``: ``R/ytvos`` as ``wtours synth``
  writes it (the DAVIS-layout ``R/davis`` has per-video instance ids, not categories).
- **held-out** (queries / validation): the videos :func:`~wtours.eval.datasets.read_ytvos` evaluates:
  ``--videos``, else ``val.txt`` / ``valid.txt`` beside ``train/``, else its seeded 20 % split of meta.json.
- **train** (memory / probe training), rule ``split``:

  ``auto``: the meta.json videos that are not held out; when there are none (the synthetic sets list every
  video in ``val.txt``: they have no split) the ``alternate`` rule instead.
  ``alternate``: the held-out list sorted by name, videos at even positions (0, 2, ...) train, odd ones
  (1, 3, ...) are the queries.

- ``memory_root``: train = every video of that YTVOS-layout root, queries = every held-out video of
  ``root``; categories are the union of both sets' (alphabetical), both sets' labels remapped to it.

The rule, the counts and both video lists go into the instruments' ``metrics.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wtours.errors import UserError
from wtours.eval.datasets import Dataset, read_video_list, read_ytvos

SPLITS = ("auto", "alternate")


@dataclass
class Split:
    train: Dataset
    held: Dataset
    categories: list[str]  # label c (1..N) = categories[c - 1]; 0 = background
    rule: str
    train_root: Path
    held_root: Path

    @property
    def n_classes(self) -> int:
        return len(self.categories) + 1

    def doc(self) -> dict:
        return {"rule": self.rule, "train_root": str(self.train_root), "held_root": str(self.held_root),
                "train_videos": [s.name for s in self.train.sequences],
                "held_videos": [s.name for s in self.held.sequences],
                "train_frames": self.train.n_frames, "held_frames": self.held.n_frames,
                "categories": self.categories}


def category_root(kind: str, root: str | Path, instrument: str) -> Path:
    """The YTVOS-layout folder of ``--dataset kind --root root``."""
    root = Path(root)
    if kind == "ytvos":
        return root
    if kind == "synth":
        if not root.exists():
            raise UserError("dataset root not found", path=root)
        y = root / "ytvos"
        if not y.is_dir():
            raise UserError(f"missing synthetic YTVOS folder (expected ytvos/ as written by 'wtours synth'; {instrument} "
                            "needs category labels)", path=y)
        return y
    if kind == "davis":
        raise UserError(f"--dataset davis: {instrument} needs category labels (ytvos or synth); DAVIS masks are "
                        "per-video instance ids")
    raise UserError(f"unknown dataset '{kind}' (ytvos or synth)")


def _meta_videos(ds: Dataset) -> list[str]:
    train = ds.root / "train"
    meta = json.loads((train / "meta.json").read_text(encoding="utf-8"))
    return sorted(meta["videos"])


def _remap(ds: Dataset, union: list[str]) -> None:
    """Relabel ``ds`` (categories of its own meta.json) to the ``union`` list, in place (lookup tables)."""
    index = {c: i + 1 for i, c in enumerate(union)}
    table = np.arange(256, dtype=np.int16)
    for i, c in enumerate(ds.categories or []):
        table[i + 1] = index[c]
    for s in ds.sequences:
        lut = s.lut.copy()
        ok = (lut > 0) & (lut < 255)
        lut[ok] = table[lut[ok]]
        s.lut = lut
    ds.categories = list(union)


def read_split(kind: str, root: str | Path, memory_root: str | Path | None = None, videos: str | Path | None = None,
               split: str = "auto", train_frames: int = 4, held_frames: int = 4, split_seed: int = 0,
               missing: str = "error", instrument: str = "this instrument") -> Split:
    """The train and held-out sets of a category-labelled root (see the module doc); ``*_frames``: annotated
    frames per video, evenly spaced (0: all)."""
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    yroot = category_root(kind, root, instrument)
    listed = read_video_list(videos) if videos else None
    held = read_ytvos(yroot, listed, held_frames, split_seed, missing)
    held_names = [s.name for s in held.sequences]
    if memory_root is not None:
        mroot = category_root("ytvos", memory_root, instrument)
        probe = read_ytvos(mroot, None, 1, split_seed, missing)
        train = read_ytvos(mroot, _meta_videos(probe), train_frames, split_seed, missing)
        rule = (f"memory_root: train = every video of {train.root} ({len(train.sequences)}), queries = the held-out "
                f"videos of {held.root} ({len(held_names)})" + (f"; {held.split_note}" if held.split_note else ""))
        union = sorted(set(train.categories or []) | set(held.categories or []))
        _remap(train, union)
        _remap(held, union)
        return Split(train, held, union, rule, train.root, held.root)
    rest = [v for v in _meta_videos(held) if v not in set(held_names)]
    if split == "auto" and rest:
        train = read_ytvos(yroot, rest, train_frames, split_seed, missing)
        rule = (f"auto: train = the {len(rest)} meta.json videos not held out, queries = the {len(held_names)} held-out "
                "videos" + (f" ({held.split_note})" if held.split_note else " (the video list)"))
        return Split(train, held, list(held.categories or []), rule, held.root, held.root)
    names = sorted(held_names)
    if len(names) < 2:
        raise UserError(f"the alternate split needs at least 2 videos, the held-out list has {len(names)}", path=yroot)
    tr, qu = names[0::2], names[1::2]
    why = "no videos outside the held-out list" if split == "auto" else "split=alternate"
    train = read_ytvos(yroot, tr, train_frames, split_seed, missing)
    held = read_ytvos(yroot, qu, held_frames, split_seed, missing)
    rule = (f"alternate ({why}): the held-out list sorted by name, even positions train ({len(tr)}), "
            f"odd positions are the queries ({len(qu)})")
    return Split(train, held, list(held.categories or []), rule, held.root, held.root)
