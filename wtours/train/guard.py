"""Stop a diverging run before it saves or exports non-finite weights.

:class:`FiniteGuard` keeps a device-side record of the first step whose loss was not finite
(``torch.where`` on the device, no host sync per step). On the host it checks that record and the
model's weights (one ``torch._foreach_norm`` per device/dtype, max-abs norm: finite iff every value
is) every ``every`` optimizer steps, before every checkpoint save (``on_save_checkpoint``, so the
last good ``last.ckpt`` is never replaced by a bad one) and, via :meth:`FiniteGuard.check`, before
the export. The ranks agree through ``strategy.reduce_boolean_decision``. A failed check raises
:class:`DivergenceError`: one line with the step, what went non-finite (the loss, or which
weights), the checkpoint kept, and the hint given (which settings to change).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from wtours.errors import UserError


# |weight| past this is a divergence: trained ViTs and heads stay far below (max |w| ~ 1e1-1e2)
WEIGHT_BOUND = 1e6


class DivergenceError(UserError):
    """Training produced a non-finite loss or weights; nothing bad was saved or exported."""


def non_finite_weights(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers holding nan or inf (one host sync
    per device/dtype when all are finite)."""
    named = [(k, v) for k, v in module.state_dict().items() if v.is_floating_point() and v.numel()]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for _, v in named:
        groups.setdefault((v.device, v.dtype), []).append(v)
    if all(bool(torch.isfinite(torch.stack(torch._foreach_norm(ts, float("inf")))).all()) for ts in groups.values()):
        return []
    return [k for k, v in named if not bool(torch.isfinite(v).all())]


def weight_problems(module: torch.nn.Module, bound: float = WEIGHT_BOUND) -> list[str]:
    """One entry per kind of bad weight (non-finite; past ``bound``), naming the first tensor; empty when
    every floating-point parameter and buffer is finite and within ``bound`` (one host sync per
    device/dtype in that case)."""
    named = [(k, v) for k, v in module.state_dict().items() if v.is_floating_point() and v.numel()]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for _, v in named:
        groups.setdefault((v.device, v.dtype), []).append(v)
    if all(float(torch.stack(torch._foreach_norm(ts, float("inf"))).max()) <= bound for ts in groups.values()):
        return []  # nan fails the comparison too
    nonfinite = [k for k, v in named if not bool(torch.isfinite(v).all())]
    large = [(k, float(v.detach().abs().max())) for k, v in named if k not in nonfinite]
    large = [(k, m) for k, m in large if m > bound]
    out = []
    if nonfinite:
        more = f" (+{len(nonfinite) - 1} more)" if len(nonfinite) > 1 else ""
        out.append(f"non-finite weights in {nonfinite[0]}{more}")
    if large:
        k, m = max(large, key=lambda t: t[1])
        more = f" (+{len(large) - 1} more)" if len(large) > 1 else ""
        out.append(f"weights up to {m:.3g} in {k}{more}, past the bound {bound:g}")
    return out


def probe_problems(module: torch.nn.Module, batch: int = 2) -> list[str]:
    """Run a fixed probe batch (seeded normal noise, the shape of ``batch`` images at each model's input
    size) through every timm VisionTransformer inside ``module`` (eval mode, ``no_grad``, fp32, eager)
    -> one entry per model whose features are non-finite or past the sane bound."""
    import contextlib

    from timm.models.vision_transformer import VisionTransformer

    from wtours.eval.features import feature_problem

    out = []
    for name, vit in module.named_modules():
        if not isinstance(vit, VisionTransformer):
            continue
        p = next(vit.parameters(), None)
        if p is None:
            continue
        size = tuple(getattr(vit.patch_embed, "img_size", None) or (224, 224))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, *size, generator=g).to(p.device)
        was = vit.training
        stance = getattr(torch.compiler, "set_stance", None)  # compiled blocks run eagerly: no recompile
        with torch.no_grad(), torch.autocast(p.device.type, enabled=False), \
                (stance("force_eager") if stance else contextlib.nullcontext()):
            try:
                vit.eval()
                problem = feature_problem(vit.forward_features(x).float())
            finally:
                vit.train(was)
        if problem:
            out.append(f"probe features of {name or 'the model'}: {problem}")
    return out


class FiniteGuard(Callback):
    """See the module docstring. ``checkpoint``: the file a failure leaves in place (for the message);
    ``saved_step``: the step of that file when the run resumed from it."""

    def __init__(self, every: int, hint: str, checkpoint: str | Path, saved_step: int | None = None) -> None:
        self.every = max(1, int(every))
        self.hint = hint
        self.checkpoint = Path(checkpoint)
        self.saved_step = saved_step
        self._first_step: torch.Tensor | None = None  # [] int64 on the device: first bad step, -1 = none
        self._first_loss: torch.Tensor | None = None  # [] float32: that loss value
        self._batch_step = 0
        self._checked = -1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_step = trainer.global_step  # the step this (micro-)batch belongs to

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float().reshape(())
            if self._first_step is None:
                self._first_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
                self._first_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
            new = ~torch.isfinite(loss) & (self._first_step < 0)
            self._first_step = torch.where(new, self._batch_step, self._first_step)
            self._first_loss = torch.where(new, loss, self._first_loss)
        step = trainer.global_step
        if step != self._checked and step % self.every == 0:
            self.check(trainer, pl_module, probe=False)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.check(trainer, pl_module, probe=True)

    def saved(self, step: int) -> None:
        """Record that a checkpoint of ``step`` was written completely (named in a later failure)."""
        self.saved_step = int(step)

    def check(self, trainer: Any, pl_module: torch.nn.Module, probe: bool = True) -> None:
        """Raise :class:`DivergenceError` if, on any rank, the loss went non-finite, the weights went
        non-finite or past :data:`WEIGHT_BOUND`, or (``probe``: before a save or the export) the probe
        batch's features went non-finite or past the sane bound."""
        self._checked = trainer.global_step
        first = int(self._first_step) if self._first_step is not None else -1
        weights = weight_problems(pl_module)
        if probe and not weights and first < 0:
            weights = probe_problems(pl_module)
        local = first >= 0 or bool(weights)
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        parts = []
        if first >= 0:
            parts.append(f"the loss became {float(self._first_loss):g} at step {first}")
        parts.extend(weights)
        if not parts:
            parts.append("the loss or weights became non-finite on another rank")
        kept = (f"kept the last good checkpoint {self.checkpoint} (step {self.saved_step})"
                if self.saved_step is not None and self.checkpoint.is_file() else "no checkpoint was saved")
        raise DivergenceError(f"training diverged (checked at step {trainer.global_step}): {'; '.join(parts)}; "
                              f"{kept}, nothing exported; {self.hint}")
