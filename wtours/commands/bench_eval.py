"""``wtours bench eval``: evaluation speed on a DAVIS-sized synthetic set (:mod:`wtours.bench.eval`)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from wtours.bench import eval as lib
from wtours.fsutil import write_json


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
    data = Path(getattr(args, "data", None) or lib._cache_root() / "bench-eval" / f"davis_{args.sequences}x{args.frames}")
    print(f"data: {data} ({args.sequences} sequences x {args.frames} frames, 854x480)", file=sys.stderr)
    if dev.type == "cpu" and args.sequences * args.frames > 200:
        print("note: on CPU the full DAVIS-sized run takes a long time; try --sequences 4 --frames 20",
              file=sys.stderr)
    root, gen_s = lib.make_davis_sized(data, args.sequences, args.frames)
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
