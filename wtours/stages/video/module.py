"""Stage 1 as a LightningModule: a student ViT, its EMA teacher, and a stage-1 objective (DoRA).

The module handles what every objective shares; the objective handles the rest:

==========================================  ===================================================
:class:`VideoModule` (optimisation)         the objective (:mod:`wtours.objectives.interface`)
==========================================  ===================================================
student / teacher backbones (TrackingViT)   its heads (student + EMA teacher copy), prototypes
GPU multi-crop (ClipAugment), random        its state (DINO centre, queues), updated once per
streams reseeded per micro-batch            optimizer step
schedules, AdamW, per-parameter clipping    ``forward(StepInputs) -> (loss, stats)``,
backbone EMA, logging, checkpoints          ``before_optimizer_step`` / ``after_optimizer_step``
==========================================  ===================================================

The objective is an ``nn.Module`` attribute (``self.objective``), so its trainable parameters are in
the optimizer and its parameters and buffers in the checkpoint. It implements
(:class:`wtours.objectives.interface.Objective`)::

    loss, stats = objective(StepInputs(views, student, teacher, values, generator))   # per micro-batch
    objective.before_optimizer_step(values)   # grads complete and unscaled; e.g. DINO's frozen last layer
    objective.after_optimizer_step(values)    # once per optimizer step: teacher-head EMA, centre,
                                              # (TimeT: renormalise the prototypes)

``values`` (:class:`~wtours.objectives.interface.StepValues`) are the schedules at the optimizer step
(lr, wd, teacher momentum and temperature, whether the last layer is frozen). Stats are logged as
``train/<name>``. Today's objective is DoRA (:class:`wtours.objectives.dora.DoRAObjective`,
Venkataramanan et al., ICLR 2024); :func:`build_objective` is where a second one (TimeT) plugs in.

One training step, per optimizer step (``accumulate_grad_batches`` micro-batches of uint8 clips
``[B, T, 3, H, W]`` on the device), in Lightning's automatic optimisation, under the Trainer's
precision (bf16-mixed autocast on CUDA, fp32 on CPU):

1. ``training_step`` (each micro-batch): schedules at the step, reseed, :meth:`VideoModule.forward_step`
   (augment -> objective) -> loss, logged stats; Lightning runs backward.
2. ``on_before_optimizer_step``: the objective's hook (frozen parameters), then per-parameter
   gradient clipping (DINO; ``torch._foreach_norm``, no host sync).
3. ``optimizer_step``: lr / weight decay of the step into the param groups, AdamW, then
   :meth:`VideoModule.after_optimizer_step` (backbone EMA + the objective's state updates).

``wtours bench train`` runs exactly this, through a ``pl.Trainer`` on a fixed batch
(:mod:`wtours.bench.train`).

Randomness in a step (crops, head draws, drop-path) is a pure function of
``(seed, rank, global_step, batch_idx)``: a resumed run draws exactly what the uninterrupted one
would have, on every rank.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from wtours.stages.video.augment import ClipAugment, crop_resize, normalize
from wtours.models.ema import ema_update_
from wtours.models.vit import TrackingViT
from wtours.objectives.dora import (
    DoRAObjective,
    binarise_maps,
    clip_keys,
    gather_frame0,
    sample_heads,
    track_objects,
)
from wtours.objectives.interface import ObjectiveSet, StepInputs, StepValues
from wtours.objectives.timet import TimeTObjective
from wtours.train.checkpointing import CHECKPOINT_LAYOUT, ResumableState, step_seed
from wtours.stages.video.schedules import Schedules, build_schedules, steps_per_epoch
from wtours.stages.video.config import VideoPretrainConfig, training_hash


def native_img_size(arch: str) -> int:
    """The input size a timm arch is named for (``vit_small_patch16_224`` -> 224; default 224)."""
    import re

    try:
        import timm

        size = timm.models.get_pretrained_cfg_value(arch, "input_size")
        if size:
            return int(size[-1])
    except Exception:  # noqa: BLE001 - unknown names fall through to the name or 224
        pass
    m = re.search(r"_(\d{2,4})(?:\.|$)", arch)
    return int(m.group(1)) if m else 224


def make_backbone(arch: str, drop_path_rate: float, pos_interp: str = "dino") -> TrackingViT:
    """A randomly initialised :class:`TrackingViT` (``.vit`` is the timm model) with position embeddings
    at the arch's own size (exported backbones load into timm as-is); other input sizes are interpolated
    (``dynamic_img_size``) as DINO does for local crops (``pos_interp="dino"``; ``model.pos_interp``)."""
    return TrackingViT(arch, drop_path_rate=drop_path_rate, img_size=native_img_size(arch), pos_interp=pos_interp)


def build_objective(cfg: VideoPretrainConfig, embed_dim: int) -> ObjectiveSet:
    """The stage-1 objectives of ``cfg.objective`` with a positive weight (DoRA, TimeT), as one."""
    weights = cfg.objective.enabled()
    members: dict[str, nn.Module] = {}
    if "dora" in weights:
        members["dora"] = DoRAObjective(embed_dim, cfg.model, cfg.loss, cfg.tracking)
    if "timet" in weights:
        members["timet"] = TimeTObjective(embed_dim, cfg.timet)
    return ObjectiveSet(members, weights)


def load_init_(backbone: TrackingViT, arch: str, spec: str) -> None:
    """Initial weights for ``backbone`` from ``spec`` (``backbone.pt``, a timm ViT state dict file, or
    ``random:<arch>@<seed>``), read as a ViT of ``arch``: one line naming the file when its weights do not
    fit (another patch size, width or depth), from :func:`wtours.models.weights.load_backbone`."""
    from wtours.models.weights import load_backbone

    model, _ = load_backbone(spec, arch=arch)
    sd = model.state_dict()
    want = backbone.vit.state_dict()
    backbone.vit.load_state_dict({k: sd[k] if k in sd else want[k] for k in want})  # the zero classifier


def freeze_all_but_last_blocks_(backbone: TrackingViT, n: int) -> None:
    """Train only the last ``n`` transformer blocks (``n = 0``: everything); the rest (patch and position
    embeddings, earlier blocks, the final norm) get ``requires_grad=False``, as TimeT fine-tunes."""
    if n <= 0:
        return
    backbone.requires_grad_(False)
    for blk in backbone.vit.blocks[-n:]:
        blk.requires_grad_(True)


class VideoModule(ResumableState, pl.LightningModule):
    """Student/teacher backbones + the stage-1 objective; optimisation only (see the module docstring).

    Attributes: ``student`` / ``teacher`` (:class:`TrackingViT`; the teacher is the student's EMA and
    is what gets exported), ``objective`` (:class:`DoRAObjective`), ``augment``, ``generator`` (the
    objective's CPU generator), ``schedules``.

    Args:
        cfg: the resolved (validated) :class:`VideoPretrainConfig`.
    """

    def __init__(self, cfg: VideoPretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.config_hash = training_hash(cfg)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts)
        self.student = make_backbone(cfg.model.arch, cfg.model.drop_path_rate, cfg.model.pos_interp)
        self.objective = build_objective(cfg, self.student.embed_dim)
        if cfg.model.init:
            load_init_(self.student, cfg.model.arch, cfg.model.init)
        self.teacher = make_backbone(cfg.model.arch, 0.0, cfg.model.pos_interp)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        freeze_all_but_last_blocks_(self.student, cfg.model.train_blocks)
        self.augment = ClipAugment(cfg.crops, seed=cfg.seed)
        self.generator = torch.Generator(device="cpu")
        self.schedules: Schedules | None = None
        self.world = 1
        self.ema_updates = 0  # optimizer steps that updated the teacher and the objective's state (tests, logs)

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str) -> None:
        self.world = self.trainer.world_size  # setup runs under a Trainer
        self.ensure_schedules(self.world)

    def ensure_schedules(self, world: int = 1) -> Schedules:
        """Schedules for ``world`` ranks (built once; ``setup`` does it under a Trainer)."""
        if self.schedules is None:
            self.world = world
            self.schedules = build_schedules(self.cfg, steps_per_epoch(self.cfg, world), world)
        return self.schedules

    def step_values(self) -> StepValues:
        """The schedules' values at the current optimizer step (``global_step``)."""
        return self.ensure_schedules(self.world).at(self.global_step)

    def configure_model(self) -> None:
        if self.cfg.trainer.compile:
            # Compile the transformer blocks (shared by forward and forward_tracking); keeps state-dict keys.
            for net in (self.student, self.teacher):
                for blk in net.vit.blocks:
                    blk.compile()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the student backbone and the objective's trained parameters."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        values = self.ensure_schedules(self.world).at(0)
        scale = self.cfg.optim.backbone_lr_scale
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            decayed = not (name.endswith(".bias") or p.ndim == 1)
            groups.setdefault((name.startswith("student."), decayed), []).append(p)
        param_groups = [{"params": ps, "apply_wd": decayed, "lr_scale": scale if backbone else 1.0,
                         **({} if decayed else {"weight_decay": 0.0})}
                        for (backbone, decayed), ps in sorted(groups.items())]
        return torch.optim.AdamW(param_groups, lr=values.lr, weight_decay=values.wd, betas=tuple(self.cfg.optim.betas))

    # ------------------------------------------------------------------ the step

    def _reseed(self, batch_idx: int) -> None:
        seed = step_seed(self.cfg.seed, self.global_rank, self.global_step, batch_idx)
        self.augment.generator.manual_seed(seed)
        self.generator.manual_seed(seed ^ 0x5DEECE66D)
        torch.manual_seed(seed ^ 0xB5297A4D)  # drop-path of the student

    def forward_step(self, clips: torch.Tensor, values: StepValues) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch of uint8 ``clips [B, T, 3, H, W]`` -> the objective's ``(loss [], stats)``; no
        optimizer work (the objective queues its state updates in training mode)."""
        views = self.augment(clips)
        return self.objective(StepInputs(views, self.student, self.teacher, values, self.generator))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        values = self.step_values()
        self._reseed(batch_idx)
        loss, stats = self.forward_step(batch["clip"], values)
        bs = batch["clip"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for key, value in stats.items():  # the objective's monitors (collapse signals, KL, mask coverage)
            self.log(f"train/{key}", value, batch_size=bs)
        for key in ("lr", "wd", "momentum", "teacher_temp"):
            self.log(f"train/{key}", getattr(values, key), batch_size=bs)
        return loss

    # ------------------------------------------------------------------ around the optimizer step

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The objective's frozen parameters, then per-parameter gradient clipping (DINO); no host sync."""
        self.objective.before_optimizer_step(self.step_values())
        if self.cfg.optim.clip_grad > 0:
            clip_per_parameter_(self.trainable_parameters(), self.cfg.optim.clip_grad)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        values = self.step_values()
        apply_schedules_(optimizer, values)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.after_optimizer_step(values)

    @torch.no_grad()
    def after_optimizer_step(self, values: StepValues) -> None:
        """Backbone EMA and the objective's state updates, exactly once per optimizer step.

        TimeT alone with ``timet.compat_reference`` reproduces the reference's swapped EMA for the
        backbone too (``teacher <- (1 - m) teacher + m student``; timet.md §1.4)."""
        cfg = self.cfg
        swapped = cfg.timet.compat_reference and cfg.objective.dora == 0
        ema_update_(self.teacher, self.student, (1.0 - values.momentum) if swapped else values.momentum,
                    trained_only=cfg.model.train_blocks > 0)
        self.objective.after_optimizer_step(values)
        self.ema_updates += 1

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        return {"arch": self.cfg.model.arch, "layout": CHECKPOINT_LAYOUT, "generator": self.generator.get_state()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ pictures

    @torch.no_grad()
    def track_clip(self, clip: torch.Tensor, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor]:
        """Teacher tracking on one uint8 clip ``[T, 3, H, W]`` through a fixed centre view.

        Returns ``(frames [T, 3, G, G] in [0, 1], masks [T, k, N] bool, grid, maps [T, k, N])``; uses its own
        generator (``seed``) for the heads, so training randomness is untouched.
        """
        cfg = self.cfg
        t = clip.shape[0]
        frames = _centre_views(clip, cfg.crops.global_size)
        vit = self.teacher
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            out = vit.forward_tracking(normalize(frames))
        finally:
            self.teacher.train(was_training)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(seed)
        heads = sample_heads(gen, 1, vit.num_heads, cfg.tracking.objects, clip.device, per_sample=False)
        maps = track_objects(gather_frame0(out, 1, t), clip_keys(out, 1, t), heads,
                             eps=cfg.tracking.sinkhorn_eps, iters=cfg.tracking.sinkhorn_iters)
        masks = binarise_maps(maps, "sample")[0]
        return frames, masks, vit.grid(cfg.crops.global_size, cfg.crops.global_size), maps[0]

    @torch.no_grad()
    def timet_clip_labels(self, clip: torch.Tensor, shown: int = 8
                          ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor]:
        """TimeT's forwarded labels on one uint8 clip ``[T, 3, H, W]`` through a fixed centre view (teacher
        targets of frame 0, forwarded by the teacher's features): ``(frames [T, 3, G, G], masks [T, k, N] of
        the ``shown`` most frequent labels, grid, maps [T, k, N])`` in :meth:`track_clip`'s format."""
        from wtours.objectives.timet import forward_labels, timet_targets

        cfg, timet = self.cfg, self.objective.timet
        frames = _centre_views(clip, cfg.crops.global_size)
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            tok = self.teacher.forward_patches(normalize(frames))[None]  # [1, T, N, D]
        finally:
            self.teacher.train(was_training)
        grid = self.teacher.grid(cfg.crops.global_size, cfg.crops.global_size)
        q0 = timet_targets(timet.teacher_head.scores(tok[:, 0]), eps=cfg.timet.sinkhorn_eps,
                           iters=cfg.timet.sinkhorn_iters)
        maps = forward_labels(q0, tok, grid, n_last=cfg.timet.context_frames, radius=cfg.timet.window,
                              topk=cfg.timet.topk, temperature=cfg.timet.affinity_temp)[0]  # [T, K, N]
        labels = maps.argmax(1)  # [T, N]
        top = torch.bincount(labels.flatten(), minlength=maps.shape[1]).argsort(descending=True)[:shown]
        masks = labels[:, None, :] == top[None, :, None]  # [T, k, N]
        return frames, masks, grid, maps[:, top]


def _centre_views(clip: torch.Tensor, size: int) -> torch.Tensor:
    """The centre square of uint8 ``clip [T, 3, H, W]`` resized to ``size`` -> ``[T, 3, size, size]`` in [0, 1]."""
    t, _, h, w = clip.shape
    side = min(h, w)
    x0, y0 = (w - side) / 2.0, (h - side) / 2.0
    box = torch.tensor([[x0, y0, x0 + side, y0 + side]], device=clip.device).expand(t, 4)
    return crop_resize(clip.float(), box, torch.arange(t, device=clip.device), size) / 255.0


def apply_schedules_(optimizer: torch.optim.Optimizer, values: StepValues) -> None:
    """The step's lr (times the group's ``lr_scale``) into every param group, and its weight decay into
    those with ``apply_wd``."""
    for group in optimizer.param_groups:
        group["lr"] = values.lr * group.get("lr_scale", 1.0)
        if group.get("apply_wd", True):
            group["weight_decay"] = values.wd


@torch.no_grad()
def clip_per_parameter_(params: Any, max_norm: float) -> torch.Tensor | None:
    """DINO's clipping: each parameter's gradient is scaled to L2 norm <= ``max_norm`` on its own.

    One ``torch._foreach_norm`` + one ``torch._foreach_mul_``; no host sync. Returns the
    per-parameter norms before clipping (``[P]``), or None without gradients.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    by_dev: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        by_dev.setdefault((g.device, g.dtype), []).append(g)
    all_norms = []
    for gs in by_dev.values():
        norms = torch.stack(torch._foreach_norm(gs, 2.0)).float()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(gs, list(coef.to(gs[0].dtype).unbind(0)))
        all_norms.append(norms)
    return torch.cat(all_norms)


#: the name it had when stage 1 ran DoRA only (it runs DoRA and/or TimeT)
DoRAModule = VideoModule
