"""``wtours bench eval``: speed of the clustering evaluation on a DAVIS-sized synthetic set.

Writes (once, then reuses) a DAVIS-2017-layout synthetic set of ``--sequences`` x ``--frames``
frames at 854x480 (DAVIS-2017 val: 30 sequences, 1,999 frames) with
:func:`wtours.video.synth.write_davis_like`, one process per sequence, into
``$WTOURS_CACHE/bench-eval/`` (or ``~/.cache/wtours/bench-eval/``, or ``--data``). Then it runs
the full protocol on *every* frame (``frames_per_clip=0``, otherwise the default protocol: 224²
input, per-pixel k-means at 224² for F / C and 112² for D) with a random ``--arch`` encoder and
reports frames/s of feature extraction (decode + resize + forward) and seconds of clustering +
matching for F, C, D (and overclustering with ``--k``). Goal: all of DAVIS-2017 val in <= 60 s
on one H100.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from wtours.fsutil import ensure_dir, write_json


def _cache_root() -> Path:
    env = os.environ.get("WTOURS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "wtours"


def _one_sequence(args: tuple[str, int, int, int, int]) -> str:
    from wtours.video.synth import write_davis_like

    tmp, i, frames, height, width = args
    write_davis_like(Path(tmp) / f"job{i}", sequences=1, seq_frames=frames, height=height, width=width, seed=i)
    return str(i)


def make_davis_sized(root: Path, sequences: int, frames: int, height: int = 480, width: int = 854,
                     workers: int | None = None) -> tuple[Path, float]:
    """A DAVIS-layout synthetic set at ``root`` (reused when complete) -> (root, seconds spent)."""
    stamp = {"sequences": sequences, "frames": frames, "height": height, "width": width, "version": 1}
    done = root / "bench.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return root, 0.0
    t0 = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    ensure_dir(root.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        jobs = [(str(tmp), i, frames, height, width) for i in range(sequences)]
        workers = workers or min(sequences, os.cpu_count() or 1)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_one_sequence, jobs))
        names = [f"bench-{i:03d}" for i in range(sequences)]
        for i, name in enumerate(names):
            for kind in ("JPEGImages", "Annotations"):
                dst = ensure_dir(tmp / kind / "480p")
                os.replace(tmp / f"job{i}" / kind / "480p" / "synth-000", dst / name)
            shutil.rmtree(tmp / f"job{i}")
        ensure_dir(tmp / "ImageSets" / "2017")
        (tmp / "ImageSets" / "2017" / "val.txt").write_text("".join(n + "\n" for n in names))
        write_json(tmp / "bench.json", stamp)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root, time.perf_counter() - t0
