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
            self.check(trainer, pl_module)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.check(trainer, pl_module)

    def saved(self, step: int) -> None:
        """Record that a checkpoint of ``step`` was written completely (named in a later failure)."""
        self.saved_step = int(step)

    def check(self, trainer: Any, pl_module: torch.nn.Module) -> None:
        """Raise :class:`DivergenceError` if the loss or the weights went non-finite on any rank."""
        self._checked = trainer.global_step
        first = int(self._first_step) if self._first_step is not None else -1
        weights = non_finite_weights(pl_module)
        local = first >= 0 or bool(weights)
        if not trainer.strategy.reduce_boolean_decision(local, all=False):
            return
        parts = []
        if first >= 0:
            parts.append(f"the loss became {float(self._first_loss):g} at step {first}")
        if weights:
            more = f" (+{len(weights) - 1} more)" if len(weights) > 1 else ""
            parts.append(f"non-finite weights in {weights[0]}{more}")
        if not parts:
            parts.append("the loss or weights became non-finite on another rank")
        kept = (f"kept the last good checkpoint {self.checkpoint} (step {self.saved_step})"
                if self.saved_step is not None and self.checkpoint.is_file() else "no checkpoint was saved")
        raise DivergenceError(f"training diverged (checked at step {trainer.global_step}): {'; '.join(parts)}; "
                              f"{kept}, nothing exported; {self.hint}")
