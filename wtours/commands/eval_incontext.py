"""``wtours eval incontext``: in-context retrieval mIoU (:mod:`wtours.eval.incontext`)."""

from __future__ import annotations

from wtours.eval import incontext as lib


def cli_main(args) -> int:
    from wtours.config import load_config

    cfg = load_config(lib.InContextConfig, args.config, args.overrides)
    lib.evaluate_incontext(args.dataset, args.root, args.checkpoint, args.out, cfg, args.arch, args.videos, args.device,
                       trust=getattr(args, "trust_checkpoint", False), memory_root=args.memory_root)
    return 0
