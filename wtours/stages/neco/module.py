"""Stage 2 as a LightningModule: NeCo post-pretraining (Pariza et al., ICLR 2025) on image crops.

One training step on a batch of uint8 canvases ``[B, 3, H, W]`` with valid sizes ``[B, 2]``:

1. GPU multi-crop (:class:`wtours.stages.neco.crops.NeCoAugment`): ``[B, G, 3, Sg, Sg]`` global and
   ``[B, L, 3, Sl, Sl]`` local crops, boxes ``[B, G + L, 4]``.
2. Teacher (EMA, ``no_grad``), one call on the ``B*G`` global crops -> projected, L2-normalised patch
   maps ``[B, G, C, hg, wg]``.
3. Student, one call on the ``B*G`` global crops and one on the ``B*L`` local crops.
4. :class:`wtours.objectives.neco.NeCoLoss`: ROI alignment of all 10 pairs, references, soft sorting,
   cross-entropy (fp32, autocast off).

Networks: the backbone is a timm ViT loaded from ``--init`` (:mod:`wtours.models.weights`);
patch tokens after the final norm (prefix tokens dropped) go through the projection head
``D -> 2048 -> 2048 -> 256`` (GELU, trunc-normal init, no norm layers) and are L2-normalised. Student
and teacher start from the same weights, **including the head** (the reference initialises the
teacher's head independently, neco.md §1.1); the student has stochastic depth, the teacher none.

Optimisation: AdamW, four groups (backbone / head x decayed / not decayed: biases and 1-D
parameters), per-step cosine lr from ``lr_backbone`` / ``lr_head`` to ``final_lr`` (optional
linear warm-up), weight decay cosine ``.04 -> .5`` on the decayed groups, optional global
gradient-norm clipping, then the EMA teacher update (cosine ``.9995 -> 1``) once per optimizer step.

Randomness in a step (crops, references, drop-path) is a pure function of
``(seed, rank, global_step, batch_idx)``: a resumed run draws exactly what the uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from wtours.models.ema import cosine_schedule, ema_update_
from wtours.models.heads import ProjectionHead
from wtours.models.weights import build_vit
from wtours.models.vit import use_dino_pos_interp_
from wtours.stages.neco.crops import NeCoAugment
from wtours.objectives.neco import NeCoLoss
from wtours.train.checkpointing import ResumableState, step_seed
from wtours.stages.neco.config import NeCoConfig, neco_training_hash


class NeCoNet(nn.Module):
    """timm ViT (``.vit``) + projection head; ``forward`` -> L2-normalised patch maps ``[M, C, h, w]``."""

    def __init__(self, arch: str, cfg: NeCoConfig, drop_path_rate: float,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        m = cfg.model
        self.vit = build_vit(arch, state_dict, drop_path_rate=drop_path_rate)
        if getattr(m, "pos_interp", "timm") == "dino":  # DINO's bicubic +0.1 resampling for the local crops
            use_dino_pos_interp_(self.vit)
        for blk in self.vit.blocks:  # SDPA everywhere, whatever TIMM_FUSED_ATTN says
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = True
        self.patch = int(self.vit.patch_embed.patch_size[0])
        self.prefix = int(self.vit.num_prefix_tokens)
        self.head = ProjectionHead(int(self.vit.embed_dim), m.head_hidden_dim, m.head_out_dim, m.head_layers)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, 3, H, W]`` -> backbone patch tokens after the final norm ``[M, N, D]``."""
        return self.vit.forward_features(x)[:, self.prefix:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, 3, H, W]`` -> ``[M, C, H/p, W/p]`` (L2-normalised over ``C``)."""
        m, _, h, w = x.shape
        z = F.normalize(self.head(self.patch_tokens(x)), dim=-1)
        return z.transpose(1, 2).reshape(m, -1, h // self.patch, w // self.patch)


@dataclass
class NeCoSchedules:
    """Per-optimizer-step schedules (float64), indexed by ``global_step`` (clamped)."""

    total_steps: int
    steps_per_epoch: int
    lr_backbone: torch.Tensor
    lr_head: torch.Tensor
    wd: torch.Tensor
    momentum: torch.Tensor

    def at(self, step: int) -> dict[str, float]:
        i = min(max(int(step), 0), self.total_steps - 1)
        return {"lr_backbone": float(self.lr_backbone[i]), "lr_head": float(self.lr_head[i]),
                "wd": float(self.wd[i]), "momentum": float(self.momentum[i])}


def build_neco_schedules(cfg: NeCoConfig, steps_per_epoch: int) -> NeCoSchedules:
    """Schedules for ``trainer.max_steps`` steps (default ``epochs x steps_per_epoch``)."""
    o, t = cfg.optim, cfg.trainer
    total = t.max_steps if t.max_steps is not None else max(1, round(t.epochs * steps_per_epoch))
    warm = min(total, o.warmup_steps)
    return NeCoSchedules(
        total_steps=total, steps_per_epoch=steps_per_epoch,
        lr_backbone=cosine_schedule(o.lr_backbone, o.final_lr, total, warmup_steps=warm),
        lr_head=cosine_schedule(o.lr_head, o.final_lr, total, warmup_steps=warm),
        wd=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
        momentum=cosine_schedule(o.momentum_teacher, o.momentum_teacher_end, total))


class NeCoModule(ResumableState, pl.LightningModule):
    """NeCo student/teacher pair; see the module docstring.

    Args:
        cfg: the resolved :class:`NeCoConfig`.
        arch: timm arch of the backbone.
        state_dict: the ``--init`` weights (None when a checkpoint will be loaded anyway).
        steps_per_epoch: optimizer steps per data epoch (for ``trainer.epochs``).
    """

    def __init__(self, cfg: NeCoConfig, arch: str, state_dict: dict[str, torch.Tensor] | None = None,
                 steps_per_epoch: int = 1) -> None:
        super().__init__()
        self.cfg, self.arch = cfg, arch
        self.config_hash = neco_training_hash(cfg)
        torch.manual_seed(cfg.seed)  # same head init on every rank (DDP also broadcasts)
        self.student = NeCoNet(arch, cfg, cfg.model.drop_path_rate, state_dict)
        self.teacher = NeCoNet(arch, cfg, 0.0)
        if cfg.model.teacher_head == "copy":
            self.teacher.load_state_dict(self.student.state_dict())  # backbone AND head: a copy (neco.md §6)
        else:  # the reference: same backbone, the teacher's head its own random init (neco.md §1.1)
            self.teacher.vit.load_state_dict(self.student.vit.state_dict())
        self.teacher.requires_grad_(False)
        lc = cfg.loss
        self.neco = NeCoLoss(cfg.model.head_out_dim, lc.sorter, lc.impl, lc.steepness_student, lc.steepness_teacher,
                             lc.roi_size, lc.references, lc.queue_length, lc.queue_push_per_image,
                             cfg.crops.global_number, lc.torchsort_strength, lc.log_eps, seed=cfg.seed,
                             chunk_rows=lc.chunk_rows)
        self.augment = NeCoAugment(cfg.crops, seed=cfg.seed)
        self.schedules = build_neco_schedules(cfg, steps_per_epoch)
        self.ema_updates = 0
        self.skipped_images = 0  # unreadable images skipped so far (counted by NeCoDataModule, logged here)
        self.patch = self.student.patch

    # ------------------------------------------------------------------ optimisation

    def configure_model(self) -> None:
        if self.cfg.trainer.compile:
            for net in (self.student, self.teacher):
                for blk in net.vit.blocks:
                    blk.compile()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        s = self.schedules.at(0)
        groups = []
        for part, lr_key in ((self.student.vit, "lr_backbone"), (self.student.head, "lr_head")):
            decay, no_decay = [], []
            for name, p in part.named_parameters():
                if p.requires_grad:
                    (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
            groups.append({"params": decay, "lr": s[lr_key], "lr_key": lr_key, "apply_wd": True})
            groups.append({"params": no_decay, "lr": s[lr_key], "lr_key": lr_key, "apply_wd": False,
                           "weight_decay": 0.0})
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=s["lr_head"], weight_decay=s["wd"],
                                 betas=tuple(self.cfg.optim.betas))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        s = self.schedules.at(self.global_step)
        for group in optimizer.param_groups:
            group["lr"] = s[group.get("lr_key", "lr_head")]
            if group.get("apply_wd", True):
                group["weight_decay"] = s["wd"]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.after_optimizer_step(s["momentum"])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.clip_grad, foreach=True)

    @torch.no_grad()
    def after_optimizer_step(self, momentum: float) -> None:
        """EMA teacher (backbone and head), exactly once per optimizer step."""
        ema_update_(self.teacher, self.student, momentum)
        self.ema_updates += 1

    # ------------------------------------------------------------------ the step

    def _reseed(self, batch_idx: int) -> None:
        rank = self.global_rank if self._trainer is not None else 0
        seed = step_seed(self.cfg.seed, rank, self.global_step, batch_idx)
        self.augment.generator.manual_seed(seed)
        self.neco.generator.manual_seed(seed ^ 0x5DEECE66D)
        torch.manual_seed(seed ^ 0xB5297A4D)  # drop-path of the student

    def forward_step(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One NeCo forward on uint8 canvases ``images [B, 3, H, W]`` (valid ``sizes [B, 2]``) -> (loss, stats)."""
        c = self.cfg.crops
        views = self.augment(images, sizes)
        b, g = views.global_views.shape[:2]
        ln = views.local_views.shape[1]
        with torch.no_grad():
            t_maps = self.teacher(views.global_views.flatten(0, 1))
        s_global = self.student(views.global_views.flatten(0, 1))
        s_local = self.student(views.local_views.flatten(0, 1)) if ln else None
        t_maps = t_maps.unflatten(0, (b, g))
        s_global = s_global.unflatten(0, (b, g))
        s_local = (s_local.unflatten(0, (b, ln)) if s_local is not None
                   else s_global.new_zeros(b, 0, s_global.shape[2], 1, 1))
        loss, stats = self.neco(t_maps, s_global, s_local, views.boxes, c.global_size, c.local_size, self.patch)
        stats["crop_fallback"] = views.fallback.float().mean()
        return loss, stats

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._reseed(batch_idx)
        s = self.schedules.at(self.global_step)
        loss, stats = self.forward_step(batch["image"], batch["size"])
        bs = batch["image"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for key, value in stats.items():
            self.log(f"train/{key}", value, batch_size=bs)
        for key in ("lr_backbone", "lr_head", "wd", "momentum"):
            self.log(f"train/{key}", s[key], batch_size=bs)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "skipped_images"):
            self.skipped_images = dm.skipped_images
        self.log("data/skipped_images", float(self.skipped_images), batch_size=bs)
        return loss

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        return {"stage": "neco", "arch": self.arch, "queue_counters": self.neco.counters()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if "queue_counters" in state:
            self.neco.load_counters(state["queue_counters"])

    # ------------------------------------------------------------------ pictures

    @torch.no_grad()
    def pca_features(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre crops of uint8 canvases at the global size -> (``[M, 3, S, S]`` in [0, 1], first 3 PCA
        components of the student's backbone patch tokens ``[M, 3, S/p, S/p]`` in [0, 1])."""
        from wtours.train.augment import crop_resize, normalize

        s = self.cfg.crops.global_size
        h, w = sizes[:, 0].float(), sizes[:, 1].float()
        side = torch.minimum(h, w)
        x0, y0 = (w - side) / 2, (h - side) / 2
        boxes = torch.stack([x0, y0, x0 + side, y0 + side], dim=1).to(images.device)
        crops = crop_resize(images.float(), boxes, torch.arange(len(images), device=images.device), s) / 255.0
        was = self.student.training
        self.student.eval()
        try:
            tok = self.student.patch_tokens(normalize(crops)).float()  # [M, N, D]
        finally:
            self.student.train(was)
        m, n, d = tok.shape
        flat = tok.reshape(-1, d)
        flat = flat - flat.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(flat, full_matrices=False)
        proj = flat @ v[:3].T  # [M*N, 3]
        lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
        proj = ((proj - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        g = s // self.patch
        return crops, proj.reshape(m, g, g, 3).permute(0, 3, 1, 2)
