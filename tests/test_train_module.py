"""VideoModule (stage-1 LightningModule): loss falls, EMA/centre once per optimizer step, clipping, frozen last layer."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from wtours.config import load_config
from wtours.objectives.interface import StepInputs
from wtours.stages.video.config import VideoPretrainConfig
from wtours.stages.video.module import VideoModule, clip_per_parameter_

TINY = [
    "data.frames_per_clip=2", "data.batch_size=2", "data.clips_per_epoch=8",
    "crops.precrop_size=48", "crops.global_size=32", "crops.local_size=16", "crops.local_number=2",
    "model.arch=vit_tiny_patch16_224", "model.out_dim=64", "model.hidden_dim=32", "model.bottleneck_dim=16",
    "model.drop_path_rate=0.0", "tracking.objects=2", "tracking.sinkhorn_iters=5",
    "optim.lr=0.002", "optim.lr_batch_reference=2", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0",
    "trainer.max_steps=40",
]


def make_cfg(*extra: str) -> VideoPretrainConfig:
    return load_config(VideoPretrainConfig, None, [*TINY, *extra])


class FixedClips(Dataset):
    """The same two clips every time (uint8 [T, 3, H, W])."""

    def __init__(self, n: int = 1000):
        g = torch.Generator().manual_seed(0)
        self.clips = torch.randint(0, 256, (2, 2, 3, 48, 80), generator=g, dtype=torch.uint8)
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"clip": self.clips[i % 2]}


def fit(module: VideoModule, steps: int, accumulate: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(FixedClips(), batch_size=2))
    return trainer


def fixed_loss(module: VideoModule) -> float:
    batch = FixedClips()
    clips = torch.stack([batch[0]["clip"], batch[1]["clip"]])
    module.augment.generator.manual_seed(123)
    module.generator.manual_seed(123)
    centre = module.objective.dora.dino.center.clone()
    module.eval()  # an objective in eval mode changes no state (nothing queued for the centre)
    with torch.no_grad():
        loss, _ = module.forward_step(clips, module.ensure_schedules(1).at(0))
    module.train()
    module.objective.dora.dino.apply_center_update()
    assert torch.equal(centre, module.objective.dora.dino.center)
    return float(loss)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    m = VideoModule(make_cfg())
    before = fixed_loss(m)
    fit(m, 10)
    after = fixed_loss(m)
    assert after < before - 0.05, (before, after)


def test_ema_and_centre_once_per_optimizer_step_with_accumulation(monkeypatch):
    import wtours.stages.video.module as vm

    calls = {"ema": 0, "center": 0}
    real_ema = vm.ema_update_

    def counting_ema(*a, **k):
        calls["ema"] += 1
        return real_ema(*a, **k)

    monkeypatch.setattr(vm, "ema_update_", counting_ema)
    m = VideoModule(make_cfg("trainer.accumulate_grad_batches=2"))
    dino = m.objective.dora.dino  # the objective owns the centre and its queue of micro-batch means
    real_queue, real_apply = dino.queue_center, dino.apply_center_update
    queued = []

    def counting_queue(t):
        queued.append(t.shape)
        return real_queue(t)

    def counting_apply():
        calls["center"] += 1
        seen_rows.append(len(queued))
        queued.clear()
        return real_apply()

    seen_rows = []
    dino.queue_center, dino.apply_center_update = counting_queue, counting_apply
    t0 = m.objective.dora.teacher_head.mlp[0].weight.detach().clone()
    c0 = dino.center.clone()
    trainer = fit(m, 3, accumulate=2)
    assert trainer.global_step == 3
    assert calls == {"ema": 3, "center": 3}
    assert seen_rows == [2, 2, 2]  # the centre sees both micro-batches of its step
    assert m.ema_updates == 3
    assert not torch.equal(t0, m.objective.dora.teacher_head.mlp[0].weight)
    assert not torch.equal(c0, dino.center)
    assert "objective.dora.dino.center" in m.state_dict()  # the centre is checkpointed with the objective


def test_per_parameter_clipping_scales_each_gradient_on_its_own():
    a = torch.nn.Parameter(torch.zeros(3, 4))
    b = torch.nn.Parameter(torch.zeros(5))
    c = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3, 4), 10.0)  # norm sqrt(12)*10 = 34.6 -> clipped to 3
    b.grad = torch.tensor([0.3, 0.4, 0.0, 0.0, 0.0])  # norm 0.5 -> unchanged
    norms = clip_per_parameter_([a, b, c], 3.0)
    assert torch.allclose(norms, torch.tensor([12 ** 0.5 * 10, 0.5]), rtol=1e-5)
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-4)
    assert torch.allclose(a.grad, torch.full((3, 4), 3.0 / 12 ** 0.5), rtol=1e-4)  # direction kept
    assert torch.equal(b.grad, torch.tensor([0.3, 0.4, 0.0, 0.0, 0.0]))
    assert c.grad is None


def test_last_layer_is_frozen_for_the_first_epoch_only():
    # 8 clips / batch 2 = 4 steps per epoch; frozen for 0.5 epoch = 2 steps
    m = VideoModule(make_cfg("optim.freeze_last_layer_epochs=0.5"))
    assert m.ensure_schedules(1).freeze_last_layer_steps == 2
    last0 = [p.detach().clone() for p in m.objective.dora.student_head.last_layer.parameters()]
    mlp0 = m.objective.dora.student_head.mlp[0].weight.detach().clone()
    fit(m, 2)
    assert all(torch.equal(p0, p) for p0, p in zip(last0, m.objective.dora.student_head.last_layer.parameters()))
    assert not torch.equal(mlp0, m.objective.dora.student_head.mlp[0].weight)
    m2 = VideoModule(make_cfg("optim.freeze_last_layer_epochs=0.5"))
    fit(m2, 3)  # step 3 is past the frozen steps
    assert any(not torch.equal(p0, p) for p0, p in zip(last0, m2.objective.dora.student_head.last_layer.parameters()))


def test_schedules_follow_the_recipe():
    m = VideoModule(make_cfg("optim.warmup_epochs=1", "trainer.max_steps=20", "optim.lr=0.0005",
                            "optim.lr_batch_reference=256"))
    s = m.ensure_schedules(1)
    assert s.steps_per_epoch == 4 and s.total_steps == 20
    assert s.peak_lr == pytest.approx(0.0005 * 2 / 256)
    assert float(s.lr[0]) == 0.0 and float(s.lr[3]) == pytest.approx(s.peak_lr)
    assert float(s.wd[0]) == pytest.approx(0.04) and 0.39 < float(s.wd[-1]) <= 0.4
    assert float(s.momentum[0]) == pytest.approx(0.996) and float(s.momentum[-1]) > 0.9999
    opt = m.configure_optimizers()
    decay = [g for g in opt.param_groups if g["apply_wd"]]
    no_decay = [g for g in opt.param_groups if not g["apply_wd"]]
    assert len(decay) == len(no_decay) == 2  # backbone and heads (lr_scale 1 for both here)
    assert all(p.ndim > 1 for g in decay for p in g["params"]) and all(p.ndim == 1 for g in no_decay for p in g["params"])
    assert all(g["weight_decay"] == 0.0 for g in no_decay) and all(g["lr_scale"] == 1.0 for g in opt.param_groups)


def test_sinkhorn_queue_fills_with_copies_then_rolls_and_is_state():
    cfg = make_cfg("loss.centering=sinkhorn", "loss.sinkhorn_queue=6")
    obj = VideoModule(cfg).objective.dora
    assert obj.queue.shape == (6, cfg.model.bottleneck_dim) and not bool(obj.queue_ready)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    obj._push_queue(a)  # empty: filled with copies of the first rows
    torch.testing.assert_close(obj.queue, torch.cat([a, a[:2]]))
    obj._push_queue(b)  # newest first, oldest dropped
    torch.testing.assert_close(obj.queue, torch.cat([b, a[:2]]))
    assert {"queue", "queue_ready"} <= {k.split(".")[-1] for k in obj.state_dict()}
    assert "queue" not in dict(VideoModule(make_cfg("loss.centering=sinkhorn")).objective.dora.named_buffers())


@pytest.mark.parametrize("full_view", ["none", "other_frame", "same_frame"])
def test_student_sees_the_whole_global_view_only_with_full_view(full_view):
    """Issue 16's root cause: DoRA's student never sees the kind of view the teacher's targets come from (the
    whole global view), so on small data the network's output on whole views drifts to one point and the
    targets go uniform. ``loss.full_view`` gives the student each frame's whole global view."""
    m = VideoModule(make_cfg(f"loss.full_view={full_view}"))
    seen: list[torch.Tensor] = []
    m.student.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    clips = torch.stack([FixedClips()[0]["clip"], FixedClips()[1]["clip"]])
    m.augment.generator.manual_seed(7)
    views = m.augment(clips)
    loss, _ = m.objective(StepInputs(views, m.student, m.teacher, m.ensure_schedules(1).at(0), m.generator))
    whole = views.global_views.flatten(0, 1)
    got = any(x.shape == whole.shape and torch.equal(x, whole) for x in seen)
    assert got == (full_view != "none")
    assert torch.isfinite(loss)


def test_proof_presets_give_the_student_whole_views_and_the_paper_presets_do_not():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "video"
    for name in ("proof", "proof_long", "proof_dora_timet"):
        cfg = load_config(VideoPretrainConfig, root / f"{name}.yaml", [])
        assert cfg.loss.full_view == "same_frame" and cfg.loss.full_view_weight > 0, name
        assert cfg.loss.sinkhorn_queue > 0 and cfg.loss.centering == "sinkhorn", name
    for name in ("dora_vits16", "dora_timet_vits16"):  # the paper recipes stay DoRA's
        cfg = load_config(VideoPretrainConfig, root / f"{name}.yaml", [])
        assert cfg.loss.full_view == "none" and cfg.loss.sinkhorn_queue == 0, name
