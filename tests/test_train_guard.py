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


def test_guard_stops_finite_weights_past_the_bound(tmp_path):
    """Issue 20 #1: 2 steps at lr 1e30 left finite weights of 5e27, which the finite-only check let through."""
    from wtours.train.guard import DivergenceError, FiniteGuard

    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    guard = FiniteGuard(every=2, hint="h", checkpoint=tmp_path / "last.ckpt")
    trainer = _Trainer()
    trainer.global_step = 2
    guard.on_train_batch_end(trainer, net, {"loss": torch.tensor(1.0)}, None, 0)  # sane: nothing happens
    with torch.no_grad():
        net[0].weight[0, 0] = 5e27
    trainer.global_step = 4
    with pytest.raises(DivergenceError) as e:
        guard.on_train_batch_end(trainer, net, {"loss": torch.tensor(1.0)}, None, 0)
    assert str(e.value) == ("training diverged (checked at step 4): weights up to 5e+27 in 0.weight, past the "
                            "bound 1e+06; no checkpoint was saved, nothing exported; h")


def _probe_net():
    import timm

    class Wrapped(torch.nn.Module):  # as the stage modules hold their ViTs: nested, several of them
        def __init__(self):
            super().__init__()
            self.student = torch.nn.ModuleDict({"vit": timm.create_model(
                "vit_tiny_patch16_224", img_size=32, num_classes=0, drop_path_rate=0.5)})
            self.teacher = torch.nn.ModuleDict({"vit": timm.create_model("vit_tiny_patch16_224", img_size=32,
                                                                         num_classes=0)})
    return Wrapped().train()


def test_guard_probe_forward_catches_features_past_the_bound_before_a_save(tmp_path):
    """Weights within their bound can still give insane features: the probe batch before a save sees them;
    it consumes no random numbers and leaves the train/eval modes as they were."""
    from wtours.train.guard import DivergenceError, FiniteGuard, probe_problems

    net = _probe_net()
    assert probe_problems(net) == []
    guard = FiniteGuard(every=1, hint="h", checkpoint=tmp_path / "last.ckpt")
    trainer = _Trainer()
    trainer.global_step = 3
    state = torch.get_rng_state()
    guard.on_save_checkpoint(trainer, net, {})  # sane: nothing happens
    assert torch.equal(torch.get_rng_state(), state)
    assert net.student.vit.training and net.teacher.vit.training
    with torch.no_grad():
        net.teacher.vit.norm.weight.fill_(9e5)  # below the weight bound (1e6); features ~1e6
    with pytest.raises(DivergenceError) as e:
        guard.on_save_checkpoint(trainer, net, {})
    msg = str(e.value)
    assert msg.startswith("training diverged (checked at step 3): probe features of teacher.vit: features reach ")
    assert "past the sane bound 100000" in msg and "student" not in msg
    trainer.global_step = 4
    guard.on_train_batch_end(trainer, net, {"loss": torch.tensor(1.0)}, None, 0)  # periodic check: weights only
