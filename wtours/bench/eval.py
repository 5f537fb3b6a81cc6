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
import sys
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


def cli_main(args) -> int:
    import torch

    from wtours.errors import UserError
    from wtours.eval.cli import evaluate_clustering, resolve_device
    from wtours.eval.config import EvalConfig

    if args.sequences < 1 or args.frames < 1:
        raise UserError("--sequences and --frames must be >= 1")
    bad_k = [k for k in (getattr(args, "k", None) or []) if k < 1]
    if bad_k:
        raise UserError(f"--k {bad_k[0]}: K must be >= 1")
    if args.json:
        from wtours.fsutil import check_output_file

        check_output_file(args.json, "--json")
    dev = resolve_device(args.device)
    data = Path(getattr(args, "data", None) or _cache_root() / "bench-eval" / f"davis_{args.sequences}x{args.frames}")
    print(f"data: {data} ({args.sequences} sequences x {args.frames} frames, 854x480)", file=sys.stderr)
    if dev.type == "cpu" and args.sequences * args.frames > 200:
        print("note: on CPU the full DAVIS-sized run takes a long time; try --sequences 4 --frames 20",
              file=sys.stderr)
    root, gen_s = make_davis_sized(data, args.sequences, args.frames)
    cfg = EvalConfig(frames_per_clip=0, overlays=0, overcluster_k=list(getattr(args, "k", None) or []))
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        m = evaluate_clustering("davis", root, f"random:{args.arch}", out, cfg, device=str(dev), verbose=False)
        wall = time.perf_counter() - t0
    t = m["timing"]
    clustering = {k: t[k] for k in t if k in ("pca", "F", "C", "D") or k.startswith("overcluster_")}
    result = {
        "device": m["settings"]["device_name"], "torch": torch.__version__, "arch": args.arch,
        "sequences": args.sequences, "frames": m["n_frames"], "resolution": "854x480",
        "generate_data_s": gen_s,
        "features_s": t["features"], "features_frames_per_s": t["frames_per_second"],
        "clustering_s": clustering, "clustering_total_s": sum(clustering.values()),
        "model_load_s": t["load"], "eval_total_s": wall,
        "scores": {k: m[k] for k in ("F", "C", "D")},
        "K": m["K"], "goal": "DAVIS-2017 val (30 x ~67 frames) F/C/D in <= 60 s on one H100",
    }
    lines = [
        f"device {result['device']}, {args.arch} (random), {result['frames']} frames at 854x480 "
        f"({args.sequences} sequences), all frames, default protocol",
        f"  features (decode+resize+forward): {t['features']:.2f} s = {t['frames_per_second']:.1f} frames/s",
        *[f"  {k:>16s}: {v:.2f} s" for k, v in clustering.items()],
        f"  clustering+matching total: {result['clustering_total_s']:.2f} s",
        f"  whole evaluation (load, features, F/C/D, outputs): {wall:.2f} s",
    ]
    if gen_s:
        lines.append(f"  (generating the synthetic set took {gen_s:.1f} s, not counted; cached for reuse)")
    print("\n".join(lines))
    if args.json:
        write_json(args.json, result)
    return 0
