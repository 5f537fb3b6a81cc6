"""The contract between the stage-1 LightningModule and a stage-1 objective (DoRA today, TimeT next).

The module (:class:`wtours.train.video_module.DoRAModule`) owns what every objective shares: the
student backbone, its EMA teacher backbone, the GPU augmentation, the per-step schedules, the
optimizer, gradient clipping and the random streams. An objective owns everything of its own: its
heads (student copy trained, teacher copy as an EMA), its state (DINO's centre, TimeT's prototypes,
queues) and how it turns a batch of views into a loss. It is an ``nn.Module`` attribute of the
LightningModule, so its parameters are trained by the module's optimizer (those with
``requires_grad``) and its parameters and buffers are in the checkpoint's state dict.

An objective implements (:class:`Objective`)::

    loss, stats = objective(StepInputs(views, student, teacher, values, generator))
        # one micro-batch: loss [] (fp32, what backward runs on) and stats {name: [] tensor}
        # (logged as train/<name>; no host syncs). State updates that must wait for the optimizer
        # step are queued here (e.g. DINOLoss.queue_center), and only in training mode: an objective
        # in eval mode computes the same loss and changes nothing.
    objective.before_optimizer_step(values)
        # gradients are complete (accumulated, unscaled), before clipping and the step: e.g. drop the
        # grads of parameters frozen at this step (DINO's last layer during the first epoch)
    objective.after_optimizer_step(values)
        # exactly once per optimizer step, after it: EMA of its teacher parts (values.momentum) and
        # state updates (the DINO centre; TimeT: renormalise the prototypes to unit rows)

Randomness inside ``forward`` comes from ``inputs.generator`` (reseeded by the module for every
micro-batch from ``(seed, rank, step, micro-batch)``, so a resumed run draws what the uninterrupted
one would) or from the global torch RNG (drop-path); nothing else. Shapes: ``B`` clips, ``T``
frames, ``V`` local crops, ``G`` / ``L`` global / local crop sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class StepValues:
    """The schedules' values at optimizer step ``step`` (see :mod:`wtours.train.schedules`)."""

    step: int
    lr: float
    wd: float
    momentum: float  # teacher EMA momentum
    teacher_temp: float
    freeze_last_layer: bool  # DINO: the head's last layer gets no update at this step


class StepInputs(NamedTuple):
    """What an objective gets for one micro-batch."""

    views: Any  # wtours.augment.AugmentedViews: global_views [B, T, 3, G, G], local_views [B, T, V, 3, L, L]
    student: nn.Module  # wtours.models.vit.TrackingViT, trained (drop-path on)
    teacher: nn.Module  # TrackingViT, the student's EMA; call it under no_grad
    values: StepValues
    generator: torch.Generator  # CPU generator for the objective's own draws (e.g. DoRA's attention heads)


@runtime_checkable
class Objective(Protocol):
    """A stage-1 objective (an ``nn.Module``); see the module docstring."""

    def __call__(self, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def before_optimizer_step(self, values: StepValues) -> None: ...

    def after_optimizer_step(self, values: StepValues) -> None: ...
