"""The divergence guard: a device-side flag checked on the host every N steps and before saves."""

from __future__ import annotations

import torch
import pytest


class _Strategy:
    @staticmethod
    def reduce_boolean_decision(decision, all=True):
        return decision


class _Trainer:
    def __init__(self) -> None:
        self.global_step = 0
        self.strategy = _Strategy()


def test_guard_stops_at_a_non_finite_loss_and_names_the_step(tmp_path):
    from wtours.train.guard import DivergenceError, FiniteGuard

    net = torch.nn.Linear(3, 2)
    trainer = _Trainer()
    guard = FiniteGuard(every=4, hint="lower optim.lr (now 1e+05)", checkpoint=tmp_path / "last.ckpt")
    for step, loss in enumerate([1.0, 2.0, float("inf"), 3.0]):
        trainer.global_step = step
        guard.on_train_batch_start(trainer, net, None, 0)
        trainer.global_step = step + 1
        if step < 3:  # the flag stays on the device until the check at step 4
            guard.on_train_batch_end(trainer, net, {"loss": torch.tensor(loss)}, None, 0)
    with pytest.raises(DivergenceError) as e:
        guard.on_train_batch_end(trainer, net, {"loss": torch.tensor(3.0)}, None, 0)
    assert str(e.value) == ("training diverged (checked at step 4): the loss became inf at step 2; no checkpoint "
                            "was saved, nothing exported; lower optim.lr (now 1e+05)")


def test_guard_names_non_finite_weights_before_a_save(tmp_path):
    from wtours.train.guard import DivergenceError, FiniteGuard

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    (tmp_path / "last.ckpt").write_bytes(b"x")
    guard = FiniteGuard(every=100, hint="h", checkpoint=tmp_path / "last.ckpt")
    guard.saved(6)
    trainer = _Trainer()
    trainer.global_step = 7
    guard.on_save_checkpoint(trainer, net, {})  # all finite: nothing happens
    with torch.no_grad():
        net[1].bias[0] = float("nan")
    with pytest.raises(DivergenceError) as e:
        guard.on_save_checkpoint(trainer, net, {})
    assert "non-finite weights in 1.bias;" in str(e.value)
    assert f"kept the last good checkpoint {tmp_path / 'last.ckpt'} (step 6)" in str(e.value)
