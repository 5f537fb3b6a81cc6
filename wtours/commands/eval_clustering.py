"""``wtours eval clustering``: unsupervised video segmentation by clustering (:mod:`wtours.eval.cli`)."""

from __future__ import annotations

from wtours.config import load_config
from wtours.errors import UserError
from wtours.eval import cli as lib
from wtours.eval.config import EvalConfig


def cli_main(args) -> int:
    cfg = load_config(EvalConfig, args.config, args.overrides)
    if args.k:
        bad = [k for k in args.k if k < 1]
        if bad:
            raise UserError(f"--k {bad[0]}: K must be >= 1")
        cfg.overcluster_k = list(args.k)
    if getattr(args, "frames_per_clip", None) is not None:
        if args.frames_per_clip < 0:
            raise UserError(f"--frames-per-clip {args.frames_per_clip}: must be >= 0 (0 = every annotated frame)")
        cfg.frames_per_clip = args.frames_per_clip
    if getattr(args, "repeats", None) is not None:
        if args.repeats < 1:
            raise UserError(f"--repeats {args.repeats}: must be >= 1")
        cfg.repeats = args.repeats
    lib.evaluate_clustering(args.dataset, args.root, args.checkpoint, args.out, cfg, args.arch, args.videos, args.device,
                        trust=getattr(args, "trust_checkpoint", False))
    return 0
