"""``wtours eval linear``: linear-probe mIoU (:mod:`wtours.eval.linear_probe`)."""

from __future__ import annotations

from wtours.eval import linear_probe as lib


def cli_main(args) -> int:
    from wtours.config import load_config

    cfg = load_config(lib.LinearConfig, args.config, args.overrides)
    lib.evaluate_linear(args.dataset, args.root, args.checkpoint, args.out, cfg, args.arch, args.videos, args.device,
                    trust=getattr(args, "trust_checkpoint", False), memory_root=args.memory_root)
    return 0
