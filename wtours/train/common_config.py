"""Config pieces shared by the training stages (:mod:`wtours.stages.video.config`, :mod:`wtours.stages.neco.config`).

* value checks used by the sections' ``validate()`` methods (:func:`at_least`, :func:`positive`,
  :func:`check_prob`, :func:`check_range`): each raises ``ValueError("<key>: ...")``, which
  :func:`wtours.config.from_dict` turns into a one-line ``ConfigError`` naming the full key;
* the ``trainer`` and ``log`` sections (:class:`TrainerConfig`, :class:`LogConfig`); a stage changes
  their defaults by subclassing;
* :func:`hash_training_view`: the resume check's hash of the part of a config a run must keep.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal, Optional


def check_range(name: str, pair: tuple[float, float], lo: float, hi: float) -> None:
    a, b = pair
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name}: expected {lo} <= min <= max <= {hi}, got {list(pair)}")


def at_least(cfg: object, minimum: int, *names: str) -> None:
    """Each named integer field of ``cfg`` must be ``>= minimum`` (None is allowed: 'not set')."""
    for name in names:
        v = getattr(cfg, name)
        if v is not None and v < minimum:
            raise ValueError(f"{name}: must be >= {minimum}, got {v}")


def positive(cfg: object, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name}: must be positive, got {getattr(cfg, name)}")


def check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: a probability must lie in [0, 1], got {p}")


@dataclass
class TrainerConfig:
    """Run length, precision, devices, checkpoints."""

    epochs: float = 100
    max_steps: Optional[int] = None
    accumulate_grad_batches: int = 1
    # auto: bf16-mixed on CUDA, 32-true on CPU; 16-mixed (GradScaler) for GPUs without bf16 (V100)
    precision: Literal["auto", "bf16-mixed", "16-mixed", "32", "32-true"] = "auto"
    compile: bool = False
    devices: str = "auto"
    num_nodes: int = 1
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    checkpoint_every: int = 1000
    log_every: int = 10
    deterministic: bool = False
    # CPU runs: torch intra-op threads (0: torch's default). On a small, shared CPU 1 thread is often the
    # fastest for the small ops of the tiny presets (threads x DataLoader workers oversubscribe the cores)
    cpu_threads: int = 0

    def validate(self) -> None:
        positive(self, "epochs")
        at_least(self, 1, "max_steps", "accumulate_grad_batches", "checkpoint_every", "log_every", "num_nodes")
        at_least(self, 0, "cpu_threads")


@dataclass
class LogConfig:
    """Pictures, progress bar and loggers."""

    picture_every: int = 500
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        if self.picture_every < 0:
            raise ValueError(f"picture_every: must be >= 0 (0 turns pictures off), got {self.picture_every}")


#: trainer keys that change what a run computes (the rest: devices, cadence, threads, may change on resume)
TRAINING_TRAINER_KEYS = ("accumulate_grad_batches", "precision", "epochs", "max_steps")


def hash_training_view(view: dict) -> str:
    """16 hex digits of the sha256 of a config's training view (stored in checkpoints, compared on resume)."""
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:16]
