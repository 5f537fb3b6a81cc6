"""The contract between the stage-1 LightningModule and a stage-1 objective (DoRA today, TimeT next).

The module (:class:`wtours.stages.video.module.VideoModule`) owns what every objective shares: the
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
    """The schedules' values at optimizer step ``step`` (see :mod:`wtours.stages.video.schedules`)."""

    step: int
    lr: float
    wd: float
    momentum: float  # teacher EMA momentum
    teacher_temp: float
    freeze_last_layer: bool  # DINO: the head's last layer gets no update at this step


class StepInputs(NamedTuple):
    """What an objective gets for one micro-batch."""

    views: Any  # wtours.stages.video.augment.AugmentedViews: global_views [B, T, 3, G, G], local_views [B, T, V, 3, L, L]
    student: nn.Module  # wtours.models.vit.TrackingViT, trained (drop-path on)
    teacher: nn.Module  # TrackingViT, the student's EMA; call it under no_grad
    values: StepValues
    generator: torch.Generator  # CPU generator for the objective's own draws (e.g. DoRA's attention heads)
    # per micro-batch results that one objective computes and another may reuse (e.g. DoRA's teacher pass
    # over the global views, "teacher_tracking", whose patch tokens TimeT needs); None: no sharing
    cache: dict | None = None


@runtime_checkable
class Objective(Protocol):
    """A stage-1 objective (an ``nn.Module``); see the module docstring."""

    def __call__(self, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def before_optimizer_step(self, values: StepValues) -> None: ...

    def after_optimizer_step(self, values: StepValues) -> None: ...


class ObjectiveSet(nn.Module):
    """Several objectives as one: ``loss = sum_i w_i * loss_i`` (``weights``: name -> ``w_i`` > 0).

    The members are attributes by name (``objective.dora``, ``objective.timet``; state-dict keys
    ``objective.<name>.*``). They share one ``cache`` per micro-batch, so the teacher runs once over
    the global views. Stats: every member's, plus ``<name>_loss`` (unweighted) for each member when
    there are several.
    """

    def __init__(self, members: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        if not members or set(members) != set(weights):
            raise ValueError(f"members {sorted(members)} and weights {sorted(weights)} must name the same objectives")
        for name, m in members.items():
            self.add_module(name, m)
        self.weights = {k: float(v) for k, v in weights.items()}

    def members(self) -> list[tuple[str, nn.Module]]:
        return [(name, getattr(self, name)) for name in self.weights]

    def forward(self, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = inputs._replace(cache={} if inputs.cache is None else inputs.cache)
        total: torch.Tensor | None = None
        stats: dict[str, torch.Tensor] = {}
        for name, m in self.members():
            loss, st = m(inputs)
            stats.update(st)
            if len(self.weights) > 1:
                stats[f"{name}_loss"] = loss.detach()
            term = self.weights[name] * loss
            total = term if total is None else total + term
        assert total is not None
        return total, stats

    def before_optimizer_step(self, values: StepValues) -> None:
        for _, m in self.members():
            m.before_optimizer_step(values)

    def after_optimizer_step(self, values: StepValues) -> None:
        for _, m in self.members():
            m.after_optimizer_step(values)
