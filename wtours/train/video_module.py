"""Stage 1 as a LightningModule: DoRA (Venkataramanan et al., ICLR 2024) on uint8 video clips.

One training step on a batch of clips ``[B, T, 3, H, W]`` (uint8, on the device):

1. GPU multi-crop (:class:`wtours.augment.ClipAugment`): global views ``[B, T, 3, G, G]``
   (geometry shared by a clip's frames), local crops ``[B, T, V, 3, L, L]``.
2. Teacher (EMA, no grad), **one call** on the ``B*T`` global views: [CLS] -> head logits
   ``[B*T, C]``, plus the last block's queries/keys and [CLS] attention row.
3. Tracking (``wtours.objectives.dora``): ``k`` random heads of frame 0 -> prototypes ->
   Sinkhorn-Knopp -> cross-attention into every frame -> binary masks ``[B, T, k, N]`` ->
   masked global views ``[B, T, k, 3, G, G]``.
4. Student, **one call** on the ``B*T*k`` masked views and **one call** on the ``B*T*V`` local
   crops; DoRA loss per frame against the teacher's logits (centred, sharpened).

After every *optimizer* step (also with gradient accumulation): per-parameter gradient clipping
(before the step, ``torch._foreach_norm``), last layer frozen for ``freeze_last_layer_steps``,
lr / weight decay from the per-step schedules, then the EMA teacher update and the centre update
(mean of the accumulated micro-batches' teacher logits, all-reduced over ranks).

Randomness in a step (crops, head draws, drop-path) is a pure function of
``(seed, rank, global_step, batch_idx)``: a resumed run draws exactly what the uninterrupted one
would have, on every rank.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from wtours.augment import ClipAugment, crop_resize, normalize
from wtours.config import to_dict
from wtours.models.ema import ema_update_
from wtours.models.heads import DINOHead
from wtours.models.vit import TrackingViT
from wtours.objectives.collapse import collapse_stats
from wtours.objectives.dino import DINOLoss
from wtours.objectives.koleo import koleo_loss
from wtours.objectives.dora import (
    binarise_maps,
    clip_keys,
    dora_loss,
    gather_frame0,
    mask_views,
    sample_heads,
    track_objects,
)
from wtours.train.schedules import Schedules, build_schedules, steps_per_epoch
from wtours.train.video_config import VideoPretrainConfig, training_hash


class DoRANet(nn.Module):
    """Backbone (:class:`TrackingViT`, ``.backbone.vit`` is the timm model) + DINO head."""

    def __init__(self, cfg: VideoPretrainConfig, drop_path_rate: float) -> None:
        super().__init__()
        m = cfg.model
        # position embeddings at the arch's own size (exported backbones load into timm as-is);
        # other input sizes are interpolated (dynamic_img_size), as DINO does for local crops
        self.backbone = TrackingViT(m.arch, drop_path_rate=drop_path_rate, img_size=native_img_size(m.arch))
        self.head = DINOHead(self.backbone.embed_dim, out_dim=m.out_dim, hidden_dim=m.hidden_dim,
                             bottleneck_dim=m.bottleneck_dim, nlayers=m.head_layers,
                             norm_last_layer=m.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, 3, H, W]`` -> head logits ``[M, C]``."""
        return self.head(self.backbone(x))

    def forward_with_cls(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[M, 3, H, W]`` -> (head logits ``[M, C]``, backbone [CLS] ``[M, D]``)."""
        cls = self.backbone(x)
        return self.head(cls), cls


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


def step_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and platforms)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class DoRAModule(pl.LightningModule):
    """DoRA student/teacher pair with the DINO loss; see the module docstring.

    Args:
        cfg: the resolved :class:`VideoPretrainConfig`.
    """

    def __init__(self, cfg: VideoPretrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.config_hash = training_hash(cfg)
        torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts)
        self.student = DoRANet(cfg, cfg.model.drop_path_rate)
        self.teacher = DoRANet(cfg, 0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.dino = DINOLoss(cfg.model.out_dim, cfg.loss.student_temp, cfg.loss.center_momentum,
                             centering=cfg.loss.centering, sinkhorn_iters=cfg.loss.sinkhorn_iters)
        self.augment = ClipAugment(cfg.crops, seed=cfg.seed)
        self.head_generator = torch.Generator(device="cpu")
        self.schedules: Schedules | None = None
        self.world = 1
        self.ema_updates = 0  # optimizer steps that updated the teacher and centre (tests, logs)
        self._center_acc: list[torch.Tensor] = []
        if cfg.tracking.objects > self.student.backbone.num_heads:
            from wtours.errors import ConfigError

            raise ConfigError(f"tracking.objects: {cfg.tracking.objects} objects need as many attention heads, "
                              f"'{cfg.model.arch}' has {self.student.backbone.num_heads}")

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str) -> None:
        self.world = self.trainer.world_size if self._trainer is not None else 1
        if self.schedules is None:
            self.schedules = build_schedules(self.cfg, steps_per_epoch(self.cfg, self.world), self.world)

    def ensure_schedules(self, world: int = 1) -> Schedules:
        """Schedules for ``world`` ranks (built lazily; ``setup`` does it under a Trainer)."""
        if self.schedules is None:
            self.world = world
            self.schedules = build_schedules(self.cfg, steps_per_epoch(self.cfg, world), world)
        return self.schedules

    def configure_model(self) -> None:
        if self.cfg.trainer.compile:
            # Compile the transformer blocks (shared by forward and forward_tracking); keeps state-dict keys.
            for net in (self.student, self.teacher):
                for blk in net.backbone.vit.blocks:
                    blk.compile()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        sched = self.ensure_schedules(self.world)
        decay, no_decay = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        groups = [{"params": decay, "apply_wd": True}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]
        return torch.optim.AdamW(groups, lr=float(sched.lr[0]), weight_decay=float(sched.wd[0]),
                                 betas=tuple(self.cfg.optim.betas))

    # ------------------------------------------------------------------ the step

    def _reseed(self, batch_idx: int) -> None:
        rank = self.global_rank if self._trainer is not None else 0
        seed = step_seed(self.cfg.seed, rank, self.global_step, batch_idx)
        self.augment.generator.manual_seed(seed)
        self.head_generator.manual_seed(seed ^ 0x5DEECE66D)
        torch.manual_seed(seed ^ 0xB5297A4D)  # drop-path of the student

    def forward_step(self, clips: torch.Tensor, teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One DoRA forward on uint8 ``clips [B, T, 3, H, W]`` -> (loss, stats); no optimizer work.

        The teacher's logits of this micro-batch are queued for the centre update.
        """
        cfg = self.cfg
        b, t = clips.shape[:2]
        views = self.augment(clips)
        g = views.global_views  # [B, T, 3, G, G]
        vit = self.teacher.backbone
        with torch.no_grad():
            out = vit.forward_tracking(g.flatten(0, 1))  # rows b*T + t
            t_logits = self.teacher.head(out.cls)  # [B*T, C]
            heads = sample_heads(self.head_generator, b, vit.num_heads, cfg.tracking.objects, g.device,
                                 per_sample=cfg.tracking.per_sample_heads)
            maps = track_objects(gather_frame0(out, b, t), clip_keys(out, b, t), heads,
                                 eps=cfg.tracking.sinkhorn_eps, iters=cfg.tracking.sinkhorn_iters)
            masks = binarise_maps(maps, cfg.tracking.threshold)  # [B, T, k, N]
            masked = mask_views(g, masks, vit.patch_size)  # [B, T, k, 3, G, G]
        k, v = masked.shape[2], views.local_views.shape[2]
        s_masked, s_cls = self.student.forward_with_cls(masked.flatten(0, 2))
        s_masked = s_masked.unflatten(0, (b, t, k))  # [B, T, k, C]
        s_local = self.student(views.local_views.flatten(0, 2)).unflatten(0, (b, t, v))  # [B, T, V, C]
        t_logits = t_logits.unflatten(0, (b, t))  # [B, T, C]
        q = self.dino.targets(t_logits, teacher_temp)  # [B, T, C]
        ce = dora_loss(s_local, s_masked, t_logits, self.dino.center, cfg.loss.student_temp, teacher_temp,
                       compat_reference=cfg.loss.compat_reference, targets=q)
        stats = collapse_stats(q, out.cls, self.dino.center)
        stats["mask_coverage"] = masks.float().mean().detach()
        # cross-entropy = teacher entropy + KL(teacher || student): the KL is the part the student controls
        stats["kl"] = ce.detach() - stats["teacher_entropy"]
        loss = ce
        if cfg.loss.koleo_weight > 0:  # per object: the B*T masked views of object j form one group
            reg = koleo_loss(s_cls.unflatten(0, (b * t, k)).transpose(0, 1))
            stats["koleo"] = reg.detach()
            loss = ce + cfg.loss.koleo_weight * reg
        self._center_acc.append(t_logits.detach().float().mean(dim=(0, 1)).unsqueeze(0))
        return loss, stats

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        sched = self.ensure_schedules(self.world)
        self._reseed(batch_idx)
        s = sched.at(self.global_step)
        loss, stats = self.forward_step(batch["clip"], s["teacher_temp"])
        bs = batch["clip"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for key, value in stats.items():  # collapse monitors (wtours.objectives.collapse), KL, mask coverage
            self.log(f"train/{key}", value, batch_size=bs)
        for key in ("lr", "wd", "momentum", "teacher_temp"):
            self.log(f"train/{key}", s[key], batch_size=bs)
        return loss

    # ------------------------------------------------------------------ around the optimizer step

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Per-parameter gradient clipping (DINO) and the frozen last layer; no host sync."""
        sched = self.ensure_schedules(self.world)
        if self.global_step < sched.freeze_last_layer_steps:
            for p in self.student.head.last_layer.parameters():
                p.grad = None
        if self.cfg.optim.clip_grad > 0:
            clip_per_parameter_(self.student.parameters(), self.cfg.optim.clip_grad)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        sched = self.ensure_schedules(self.world)
        s = sched.at(self.global_step)
        for group in optimizer.param_groups:
            group["lr"] = s["lr"]
            if group.get("apply_wd", True):
                group["weight_decay"] = s["wd"]
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.after_optimizer_step(s["momentum"])

    @torch.no_grad()
    def after_optimizer_step(self, momentum: float) -> None:
        """EMA teacher + centre, exactly once per optimizer step."""
        ema_update_(self.teacher, self.student, momentum)
        if self._center_acc:
            self.dino.update_center(torch.cat(self._center_acc))
            self._center_acc.clear()
        self.ema_updates += 1

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["wtours"] = {
            "config_hash": self.config_hash,
            "config": to_dict(self.cfg),
            "arch": self.cfg.model.arch,
            "ema_updates": self.ema_updates,
            "augment": self.augment.state_dict(),
            "head_generator": self.head_generator.get_state(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        st = checkpoint.get("wtours", {})
        self.ema_updates = int(st.get("ema_updates", 0))
        if "augment" in st:
            self.augment.load_state_dict(st["augment"])
        if "head_generator" in st:
            self.head_generator.set_state(st["head_generator"])
        rng = st.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            _set_numpy_state(rng["numpy"])
            if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    # ------------------------------------------------------------------ pictures

    @torch.no_grad()
    def track_clip(self, clip: torch.Tensor, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor]:
        """Teacher tracking on one uint8 clip ``[T, 3, H, W]`` through a fixed centre view.

        Returns ``(frames [T, 3, G, G] in [0, 1], masks [T, k, N] bool, grid, maps [T, k, N])``; uses its own
        generator (``seed``) for the heads, so training randomness is untouched.
        """
        cfg = self.cfg
        t, _, h, w = clip.shape
        side = min(h, w)
        x0, y0 = (w - side) / 2.0, (h - side) / 2.0
        box = torch.tensor([[x0, y0, x0 + side, y0 + side]], device=clip.device).expand(t, 4)
        frames = crop_resize(clip.float(), box, torch.arange(t, device=clip.device), cfg.crops.global_size) / 255.0
        vit = self.teacher.backbone
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


def _numpy_state() -> tuple:
    """numpy's global RNG state with tensors instead of arrays (loads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _set_numpy_state(state: tuple) -> None:
    name, keys, pos, has_gauss, cached = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


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
