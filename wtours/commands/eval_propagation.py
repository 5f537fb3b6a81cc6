"""``wtours eval propagation``: label propagation J&F (:mod:`wtours.eval.propagation`)."""

from __future__ import annotations

from wtours.eval import propagation as lib


def cli_main(args) -> int:
    from wtours.config import load_config

    cfg = load_config(lib.PropagationConfig, args.config, args.overrides)
    lib.evaluate_propagation(args.dataset, args.root, args.checkpoint, args.out, cfg, args.arch, args.videos,
                         args.device, trust=getattr(args, "trust_checkpoint", False))
    return 0
