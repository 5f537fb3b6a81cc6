"""What the stage engine (:mod:`wtours.train.engine`) does around a training run, in small parts.

* :func:`check_run_options`: quiets Lightning's loggers and rejects contradictory run options
  (``--fresh`` with ``--resume``, ``--num-nodes`` < 1, a CUDA accelerator without CUDA) as one line.
* :func:`launch_rank_zero`: whether this process prepares the run directory.
* :func:`set_stage_aside` (:func:`fresh_start`), :func:`drop_set_aside`: ``--fresh`` moves a stage directory aside and
  deletes it once the new run has saved a checkpoint.
* :func:`loss_endpoints`: the first and last logged loss of ``metrics.csv``.
"""

from __future__ import annotations

import csv
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from wtours.errors import ConfigError, UserError


def check_run_options(cfg: Any, resume: str | None, fresh: bool, num_nodes: int | None) -> None:
    """Quiet Lightning's "GPU available: ..." banners; raise a one-line error for contradictory options.
    ``cfg``: a stage-1 or stage-2 config (its ``trainer.accelerator``)."""
    import logging

    import torch

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "GPU available: ..." banners
    if fresh and resume is not None:
        raise UserError("--fresh and --resume contradict each other")
    if num_nodes is not None and num_nodes < 1:
        raise UserError(f"--num-nodes: must be >= 1, got {num_nodes}")
    if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator: '{cfg.trainer.accelerator}' needs a CUDA GPU, and torch finds none "
                          "here; use trainer.accelerator=auto or cpu")


def launch_rank_zero() -> bool:
    """True in the process that starts a run (not in ranks > 0 of torchrun / srun / Lightning's DDP
    launcher): the one that prepares the run directory."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "JSM_NAMESPACE_RANK"):
        v = os.environ.get(var, "").strip()
        if v not in ("", "0"):
            return False
    return True


def set_stage_aside(stage: Path) -> Path | None:
    """``--fresh``: rename ``stage`` to ``<stage>.old-<time>`` (atomic) -> the new name, None if absent."""
    if not stage.exists():
        return None
    old = stage.with_name(f"{stage.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(stage, old)
    except OSError as e:
        raise UserError(f"--fresh: cannot move the previous run aside ({e.strerror or e})", path=stage) from None
    return old


def fresh_start(stage: Path, prog: str) -> None:
    """``--fresh``: :func:`set_stage_aside` ``stage``, saying so on stderr as ``prog`` (``wtours neco``)."""
    old = set_stage_aside(stage)
    if old is not None:
        print(f"{prog}: --fresh: moved the previous run's {stage.name}/ aside to {old.name}/ (deleted once the new "
              "run saves its first checkpoint)", file=sys.stderr)


def drop_set_aside(stage: Path) -> None:
    """Delete the ``<stage>.old-*`` directories left by ``--fresh`` (once the new run has a checkpoint)."""
    for old in stage.parent.glob(f"{stage.name}.old-*"):
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


def loss_endpoints(metrics_csv: str | Path, key: str = "train/loss") -> tuple[float | None, float | None]:
    """First and last logged ``key`` of a run (None when none was logged)."""
    vals = []
    try:
        with open(metrics_csv, newline="") as f:
            for row in csv.DictReader(f):
                v = row.get(key)
                if v not in (None, ""):
                    vals.append((int(float(row.get("step") or 0)), float(v)))
    except OSError:
        return None, None
    if not vals:
        return None, None
    vals.sort()
    return vals[0][1], vals[-1][1]
