"""``wtours neco``: stage 2, NeCo post-pretraining (:mod:`wtours.stages.neco.run`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from wtours.commands.common import auto_resume, print_loss_line
from wtours.errors import UserError
from wtours.stages.neco import run as stage2


def cli_main(args: Any) -> int:
    cfg = stage2.load_neco_config(args.config, args.overrides, args.max_steps, args.init, args.images, args.frames_from)
    run_dir = Path(args.out) if args.out else Path("runs") / cfg.name
    import torch

    resume, fresh = auto_resume(args, run_dir / stage2.STAGE / "last.ckpt",
                                f"wtours neco: {run_dir} holds a stage-2 run: continuing it (--fresh starts over)")
    if not cfg.init and resume is None:
        raise UserError("--init: give the encoder to start from (a stage-1 backbone.pt, a timm ViT state dict, "
                        "DINOv2 weights, or random:<timm arch>)")
    try:
        summary = stage2.run_neco(cfg, run_dir, resume=resume, devices=args.devices, num_nodes=args.num_nodes, fresh=fresh,
                           trust=getattr(args, "trust_checkpoint", False))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA out of memory (data.batch_size={cfg.data.batch_size}, crops.global_size="
                        f"{cfg.crops.global_size}, loss.impl={cfg.loss.impl}): {stage2.OOM_HINT}") from None
    except KeyboardInterrupt:
        last = run_dir / stage2.STAGE / "last.ckpt"
        hint = f"; continue by running the same command again (checkpoint: {last})" if last.is_file() else ""
        print(f"wtours neco: stopped before the end{hint}", file=sys.stderr)
        raise
    print_loss_line(summary, run_dir / stage2.STAGE / "metrics.csv")
    if summary.get("skipped_images"):
        eg = f" (e.g. {summary['bad_images'][0]})" if summary.get("bad_images") else ""
        print(f"wtours neco: skipped {summary['skipped_images']} unreadable image(s){eg}", file=sys.stderr)
    if summary.get("backbone"):
        print(f"backbone: {summary['backbone']}")
        print(f"report: {summary['report']}")
    return 0


