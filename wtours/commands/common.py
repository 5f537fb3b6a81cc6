"""What the training commands share: ``--fresh`` / ``--resume`` as they read them, the loss line they print."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from wtours.errors import UserError
from wtours.train.stage_run import loss_endpoints


def auto_resume(args: Any, last_ckpt: Path, continuing: str) -> tuple[str | None, bool]:
    """``(resume, fresh)`` of a command's ``args``: without ``--fresh`` or ``--resume``, a ``last_ckpt``
    that exists is resumed (``"last"``), printing ``continuing`` to stderr."""
    resume = args.resume
    fresh = getattr(args, "fresh", False)
    if fresh:
        if resume is not None:
            raise UserError("--fresh and --resume contradict each other")
    elif resume is None and last_ckpt.is_file():
        print(continuing, file=sys.stderr)
        resume = "last"
    return resume, fresh


def print_loss_line(summary: dict[str, Any], metrics_csv: Path) -> None:
    """``loss: first ... -> last ... after N steps; student-teacher KL ...`` (stdout) when the run's
    ``summary`` has a finite first loss."""
    first, last_loss = summary.get("first_loss"), summary.get("last_loss")
    if first is not None and last_loss is not None and math.isfinite(first):
        kl = loss_endpoints(metrics_csv, "train/kl")
        kl_txt = f"; student-teacher KL {kl[0]:.4f} -> {kl[1]:.4f}" if None not in kl else ""
        print(f"loss: first {first:.4f} -> last {last_loss:.4f} after {summary['steps']} steps{kl_txt}")
