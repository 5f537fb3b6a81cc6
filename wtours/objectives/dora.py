"""DoRA: multi-object discovery and tracking in a clip, masked views, and the DoRA loss.

Reference: S. Venkataramanan, M. N. Rizve, J. Carreira, Y. M. Asano, Y. Avrithis, "Is ImageNet
worth 1 video? Learning strong image encoders from 1 long unlabelled video", ICLR 2024.
Builds on DINO (Caron et al., ICCV 2021) and Sinkhorn-Knopp (Cuturi, NeurIPS 2013). The exact
reference semantics are in ``shared/reference/dora.md`` §3; step numbers below follow it.

Notation: ``B`` clips, ``T`` frames per clip (frame 0 = discovery frame), ``h`` heads of
head width ``dh``, ``D = h * dh``, ``N`` patches, ``k`` objects, ``C`` prototypes,
``V`` local crops per frame. Teacher outputs come from
:meth:`wtours.models.vit.TrackingViT.forward_tracking` run on the ``B*T`` global views flattened
clip-major (row ``b * T + t``).

Pipeline (all batched over ``B, T, k``; no Python loops over frames, objects or crops)::

    out   = teacher.forward_tracking(globals_.flatten(0, 1))     # rows b*T + t
    heads = sample_heads(gen, B, teacher.num_heads, 3, device, per_sample=False)   # step 1
    maps  = track_objects(gather_frame0(out, B, T), clip_keys(out, B, T), heads)   # steps 2-4
    masks = binarise_maps(maps, "batch")                                  # [B, T, k, N] bool
    views = mask_views(globals_, masks, patch=16)                         # [B, T, k, 3, H, W]
    ...
    loss = dora_loss(student_local, student_masked, teacher_logits, dino.center)   # §3.1

:class:`DoRAObjective` runs that pipeline for one micro-batch as a stage-1 objective
(:mod:`wtours.objectives.interface`): it owns the DINO heads of student and teacher and the centre
(:class:`wtours.objectives.dino.DINOLoss`), and is what training and ``wtours bench train`` call.

Step 1: ``k`` distinct heads; the [CLS]->patch attention of frame 0 in those heads gives
``A [B, k, N]``. Step 2: prototypes ``P = A Q0`` (patch queries, heads concatenated) ``[B, k, D]``.
Step 3: ``M* = SK(Z0 P^T)`` with ``Z0`` the L2-normalised frame-0 output patch tokens, then
refined prototypes ``P' = M*^T Z0`` (a weighted *sum*). Step 4: every frame ``t``:
``T'_t = softmax_N(P' K_t^T / sqrt(D))`` with ``K_t`` the last-block patch keys (heads
concatenated). Step 5: binarise each map and upsample it to pixels.

Loss (``dora_loss``), per frame ``t`` with ``q_t = softmax((g_T(x_t) - c) / tau_t)``::

    L = 1/T sum_t [ 1/2 * 1/k sum_j H(q_t, s(x_t^{o_j})) + 1/2 * 1/V sum_v H(q_t, s(x_t^{loc,v})) ]

(each ``H`` averaged over the batch). ``compat_reference=True`` reproduces the reference
``DINOLoss.forward`` exactly, with its two bugs: local crop 0 is skipped (the inherited
"skip v == iq" rule, so the local term averages crops ``1..V-1``), and the per-object frame
accumulator is never reset, which in closed form weights object ``j`` (0-based) by
``w_j = sum_{m=1}^{k-j} T^-m`` instead of ``1/T``::

    L_compat = 1/k sum_j w_j sum_t 1/2 [ Hmask(j, t) + 1/(V-1) sum_{v>=1} Hloc(v, t) ]

Departures from the reference code:
  * head sampling: ``per_sample=True`` draws distinct heads for every clip; ``False`` (the
    reference) draws one set per step, shared by the batch. Draws come from a ``torch.Generator``
    (seedable per rank) instead of Python ``random``.
  * Sinkhorn-Knopp and all tracking maths in float32 with autocast off, log-domain SK
    (:mod:`wtours.objectives.sinkhorn`).
  * the attention row and the queries/keys are computed only where needed (frame 0 / keys of
    every frame); the ``[T, B, h, N+1, N+1]`` attention tensor is never built.
  * binarisation threshold: ``"batch"`` = the reference (mean of the L2-normalised map over the
    whole batch and all patches, per object and frame); ``"sample"`` = per clip, object, frame.
  * the loss is vectorised (einsum/broadcasting), the local term is computed once per frame
    instead of once per object, and the two reference bugs are fixed unless
    ``compat_reference=True``.

Options that depart from DoRA, off by default (the reference's behaviour), for small-scale runs (issue 16;
``configs/video/proof.yaml`` turns the first two on):
  * ``loss.full_view`` (``same_frame`` / ``other_frame``): the student also sees each frame's whole global
    view, trained towards its own frame's (or the next frame's) target, with ``loss.full_view_weight`` of
    the global half. DoRA's student sees only masked views and local crops, never the kind of view the
    targets come from; at CPU scale the network's output on whole views then drifts to one point and the
    targets go uniform (measured: ``train/bottleneck_rank`` and ``train/teacher_logit_spread`` fall, the
    entropy rises to log C). ``other_frame`` pairs views of different colour jitter and did not help.
  * ``loss.sinkhorn_queue``: past teacher bottlenecks join the Sinkhorn problem (SwAV's queue).
  * ``tracking.enabled: false``: no tracking, the whole global view once instead of k masked copies (plain
    DINO multi-crop through the same code; an ablation).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wtours.models.ema import ema_update_
from wtours.models.heads import DINOHead
from wtours.objectives.collapse import collapse_stats, head_stats
from wtours.objectives.dino import DINOLoss, cross_entropy, teacher_probs
from wtours.objectives.interface import StepInputs, StepValues
from wtours.objectives.koleo import koleo_loss
from wtours.objectives.sinkhorn import sinkhorn_knopp

__all__ = [
    "sample_heads", "gather_frame0", "clip_keys", "track_objects", "binarise_maps",
    "masks_to_pixels", "mask_views", "dora_loss", "compat_object_weights", "DoRAObjective",
]


# ----------------------------------------------------------------------------- teacher plumbing

def gather_frame0(out: Any, B: int, T: int) -> Any:
    """Frame 0 of every clip from a :class:`TrackingOutput` over ``B*T`` rows (clip-major).

    Works for any NamedTuple of tensors whose first dim is ``B*T``; returns the same type with
    first dim ``B`` (views, no copies).
    """
    return type(out)(*(x.unflatten(0, (B, T))[:, 0] for x in out))


def clip_keys(out: Any, B: int, T: int) -> torch.Tensor:
    """Last-block patch keys of every frame: ``out.k [B*T, h, N, dh]`` -> ``[B, T, h, N, dh]``."""
    return out.k.unflatten(0, (B, T))


def sample_heads(generator: torch.Generator | None, B: int, num_heads: int, k: int,
                 device: torch.device | str | None = None, per_sample: bool = False) -> torch.Tensor:
    """``k`` distinct heads out of ``num_heads``, uniformly: ``LongTensor [B, k]`` on ``device``.

    ``per_sample=False`` (reference): one draw per call, repeated over the batch.
    ``per_sample=True``: an independent draw per clip. The draw uses ``generator`` (on the
    generator's own device) or the global RNG of ``device``; no host sync.
    """
    if not 1 <= k <= num_heads:
        raise ValueError(f"need 1 <= k <= num_heads, got k={k}, num_heads={num_heads}")
    gen_device = generator.device if generator is not None else device
    rows = B if per_sample else 1
    noise = torch.rand(rows, num_heads, generator=generator, device=gen_device)
    heads = noise.argsort(dim=-1)[:, :k]
    if device is not None:
        heads = heads.to(device, non_blocking=True)
    return heads.expand(B, k) if not per_sample else heads


# ----------------------------------------------------------------------------- steps 2-4

def track_objects(t0: Any, keys: torch.Tensor, heads: torch.Tensor, eps: float = 0.05,
                  iters: int = 30) -> torch.Tensor:
    """Discover ``k`` objects in frame 0 and track them into every frame (steps 2-4).

    Args:
        t0: frame-0 teacher outputs with fields ``q [B, h, N, dh]``, ``patches [B, N, D]`` and
            ``cls_attn [B, h, N]`` (e.g. :func:`gather_frame0` of a ``TrackingOutput``).
        keys: last-block patch keys of every frame ``[B, T, h, N, dh]`` (:func:`clip_keys`).
        heads: ``LongTensor [B, k]`` distinct head indices (:func:`sample_heads`).
        eps, iters: Sinkhorn-Knopp parameters (reference: 0.05, 30).

    Returns:
        ``[B, T, k, N]`` float32 refined cross-attention maps ``T'_t``; each ``[b, t, j]`` row is
        a distribution over the ``N`` patches.
    """
    q, patches, cls_attn = t0.q, t0.patches, t0.cls_attn
    B, h, N, dh = q.shape
    if keys.dim() != 5 or keys.shape[0] != B or keys.shape[2:] != (h, N, dh):
        raise ValueError(f"keys {tuple(keys.shape)} must be [B, T, h, N, dh] = [{B}, T, {h}, {N}, {dh}]")
    if patches.shape[-1] != h * dh:
        raise ValueError(f"token width {patches.shape[-1]} != heads x head_dim {h * dh}")
    k = heads.shape[-1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        A = torch.gather(cls_attn.float(), 1, heads.unsqueeze(-1).expand(B, k, N))   # [B, k, N]
        q_cat = q.float().transpose(1, 2).reshape(B, N, h * dh)                      # [B, N, D]
        protos = torch.bmm(A, q_cat)                                                   # [B, k, D]
        z = F.normalize(patches.float(), dim=-1)                                       # [B, N, D]
        assign = sinkhorn_knopp(torch.bmm(z, protos.transpose(1, 2)), eps=eps, iters=iters)  # [B, N, k]
        refined = torch.bmm(assign.transpose(1, 2), z)                                 # [B, k, D]
        k_cat = keys.float().transpose(2, 3).flatten(3)                                # [B, T, N, D]
        logits = torch.einsum("bjd,btnd->btjn", refined, k_cat) * (h * dh) ** -0.5
        return logits.softmax(dim=-1)


# ----------------------------------------------------------------------------- step 5

def binarise_maps(maps: torch.Tensor, threshold: Literal["batch", "sample"] = "batch") -> torch.Tensor:
    """Binary object masks ``[B, T, k, N]`` (bool) from tracking maps ``[B, T, k, N]``.

    Each map is L2-normalised over its ``N`` patches, then compared (strictly greater) with
    its threshold: ``"batch"`` (reference) = the mean over the whole batch and all patches, one
    scalar per (frame, object); ``"sample"`` = the mean over the patches of that map (i.e. the
    patches above the map's own average).
    """
    m = F.normalize(maps.float(), dim=-1)
    if threshold == "batch":
        thr = m.mean(dim=(0, 3), keepdim=True)
    elif threshold == "sample":
        thr = m.mean(dim=3, keepdim=True)
    else:
        raise ValueError(f"threshold must be 'batch' or 'sample', got {threshold!r}")
    return m > thr


def masks_to_pixels(masks: torch.Tensor, grid: tuple[int, int], patch: int,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Nearest upsampling of patch masks ``[B, T, k, N]`` -> ``[B, T, k, 1, gh*patch, gw*patch]``.

    ``dtype`` defaults to the input's dtype, or float32 for a bool input.
    """
    gh, gw = grid
    if masks.shape[-1] != gh * gw:
        raise ValueError(f"masks have {masks.shape[-1]} patches, grid {gh}x{gw} needs {gh * gw}")
    if dtype is None:
        dtype = torch.float32 if masks.dtype == torch.bool else masks.dtype
    m = masks.to(dtype).unflatten(-1, (gh, 1, gw, 1))
    m = m.expand(*m.shape[:-4], gh, patch, gw, patch).reshape(*masks.shape[:-1], 1, gh * patch, gw * patch)
    return m


def mask_views(images: torch.Tensor, masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Masked global views: ``images [B, T, 3, H, W]`` x ``masks [B, T, k, N]`` -> ``[B, T, k, 3, H, W]``.

    Masked-out pixels become 0 in the images' (normalised) space, as in the reference.
    """
    H, W = images.shape[-2:]
    pix = masks_to_pixels(masks, (H // patch, W // patch), patch, dtype=images.dtype)
    if pix.shape[-2:] != (H, W):
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {patch}")
    return images.unsqueeze(2) * pix


# ----------------------------------------------------------------------------- loss (§3.1)

def compat_object_weights(k: int, T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-object weights ``[k]`` of the reference's never-reset accumulator: ``sum_{m=1}^{k-j} T^-m``.

    With a reset accumulator every weight would be ``1/T``.
    """
    m = torch.arange(k, 0, -1, device=device, dtype=torch.float32)           # k-j for j = 0..k-1
    # sum_{m=1}^{n} T^-m = (1 - T^-n) / (T - 1), or n when T == 1; built on-device (no H2D copy)
    if T == 1:
        return m
    return (1.0 - float(T) ** -m) / (T - 1)


def dora_loss(student_local: torch.Tensor, student_masked: torch.Tensor, teacher: torch.Tensor,
              center: torch.Tensor, student_temp: float = 0.1,
              teacher_temp: float | torch.Tensor = 0.04, compat_reference: bool = False,
              targets: torch.Tensor | None = None, student_full: torch.Tensor | None = None,
              full_targets: torch.Tensor | None = None, full_weight: float = 0.5) -> torch.Tensor:
    """DoRA loss (scalar, fp32) between per-frame teacher targets and student views.

    Args:
        student_local: ``[B, T, V, C]`` student logits of the ``V`` local crops of each frame.
        student_masked: ``[B, T, k, C]`` student logits of the ``k`` object-masked global views.
        teacher: ``[B, T, C]`` teacher logits of the unmasked global view of each frame.
        center: ``[1, C]`` DINO centre (see :class:`wtours.objectives.dino.DINOLoss`).
        student_temp, teacher_temp: ``tau_s``, ``tau_t``.
        compat_reference: reproduce the reference formula with its two bugs (module docstring).
        targets: ``[B, T, C]`` teacher targets computed elsewhere (e.g. Sinkhorn-Knopp centring,
            :meth:`wtours.objectives.dino.DINOLoss.targets`); ``center`` and ``teacher_temp`` are then unused.
        student_full, full_targets: ``[B, T, C]`` student logits of each frame's whole global view and the
            targets it is trained towards (``loss.full_view``, a wtours departure): one more global view beside
            the ``k`` masked ones; the global half becomes ``w H(q'_t, s(x_t)) + (1 - w) 1/k sum_j H(q_t, s(x_t^{o_j}))``
            with ``w = full_weight`` (``loss.full_view_weight``).
    """
    B, T, C = teacher.shape
    if student_local.dim() != 4 or student_local.shape[:2] != (B, T) or student_local.shape[-1] != C:
        raise ValueError(f"student_local {tuple(student_local.shape)} must be [B, T, V, C] = [{B}, {T}, V, {C}]")
    if student_masked.dim() != 4 or student_masked.shape[:2] != (B, T) or student_masked.shape[-1] != C:
        raise ValueError(f"student_masked {tuple(student_masked.shape)} must be [B, T, k, C] = [{B}, {T}, k, {C}]")
    V, k = student_local.shape[2], student_masked.shape[2]
    q = (teacher_probs(teacher, center, teacher_temp) if targets is None else targets).unsqueeze(2)  # [B, T, 1, C]
    h_mask = cross_entropy(q, student_masked, student_temp).mean(0)          # [T, k]
    h_loc = cross_entropy(q, student_local, student_temp).mean(0)            # [T, V]
    if student_full is not None:
        if compat_reference:
            raise ValueError("student_full (loss.full_view) is not part of the reference formula")
        if full_targets is None or student_full.shape != (B, T, C) or full_targets.shape != (B, T, C):
            raise ValueError(f"student_full and full_targets must both be [B, T, C] = [{B}, {T}, {C}]")
        h_full = cross_entropy(full_targets, student_full, student_temp).mean(0)      # [T]
        h_global = full_weight * h_full + (1.0 - full_weight) * h_mask.mean(1)          # [T]
        return 0.5 * h_global.mean() + 0.5 * h_loc.mean()
    if not compat_reference:
        return 0.5 * h_mask.mean() + 0.5 * h_loc.mean()
    if V < 2:
        raise ValueError("compat_reference needs at least 2 local crops (the reference skips crop 0)")
    loc = h_loc[:, 1:].mean(1)                                               # [T]
    per_object = (0.5 * (h_mask + loc.unsqueeze(1))).sum(0)                  # [k]: sum over frames
    w = compat_object_weights(k, T, device=per_object.device)
    return (w * per_object).sum() / k


# ----------------------------------------------------------------------------- the objective (one micro-batch)

class DoRAObjective(nn.Module):
    """DoRA as a stage-1 objective (:class:`wtours.objectives.interface.Objective`).

    Owns the DINO projection heads (``student_head`` trained, ``teacher_head`` its EMA) and the DINO
    centre (``dino``, :class:`~wtours.objectives.dino.DINOLoss`). One call on
    :class:`~wtours.objectives.interface.StepInputs` of ``B`` clips of ``T`` frames:

    1. teacher backbone, **one call** on the ``B*T`` global views: [CLS] -> ``teacher_head`` logits
       ``[B, T, C]``, plus the last block's queries/keys and [CLS] attention row;
    2. tracking: ``k`` heads drawn from ``inputs.generator`` -> masks ``[B, T, k, N]`` -> masked global
       views ``[B, T, k, 3, G, G]``;
    3. student backbone + ``student_head``, **one call** on the ``B*T*k`` masked views and **one call**
       on the ``B*T*V`` local crops; :func:`dora_loss` per frame against the teacher's targets
       (:meth:`DINOLoss.targets <wtours.objectives.dino.DINOLoss.targets>`), plus KoLeo on the
       masked views' [CLS] when ``loss.koleo_weight > 0``;
    4. the teacher logits' mean is queued for the centre (training mode only).

    Returns ``(loss [], stats)`` with the collapse monitors (:mod:`wtours.objectives.collapse`),
    ``kl`` (cross-entropy minus teacher entropy), ``mask_coverage`` and ``koleo`` (when on).

    Args:
        embed_dim: the backbone's width ``D``.
        model, loss, tracking: the ``model`` / ``loss`` / ``tracking`` sections of
            :class:`wtours.stages.video.config.VideoPretrainConfig` (read, not imported).
    """

    def __init__(self, embed_dim: int, model: Any, loss: Any, tracking: Any) -> None:
        super().__init__()
        self.student_head = DINOHead(embed_dim, out_dim=model.out_dim, hidden_dim=model.hidden_dim,
                                     bottleneck_dim=model.bottleneck_dim, nlayers=model.head_layers,
                                     norm_last_layer=model.norm_last_layer, fp32=model.head_fp32)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)
        self.dino = DINOLoss(model.out_dim, loss.center_momentum, centering=loss.centering,
                             sinkhorn_iters=loss.sinkhorn_iters)
        self.student_temp = float(loss.student_temp)
        self.compat_reference = bool(loss.compat_reference)
        self.koleo_weight = float(loss.koleo_weight)
        self.objects = int(tracking.objects)
        self.per_sample_heads = bool(tracking.per_sample_heads)
        self.sinkhorn_eps = float(tracking.sinkhorn_eps)
        self.sinkhorn_iters = int(tracking.sinkhorn_iters)
        self.threshold = tracking.threshold
        self.tracking = bool(getattr(tracking, "enabled", True))
        self.full_view = str(getattr(loss, "full_view", "none"))
        self.full_view_weight = float(getattr(loss, "full_view_weight", 0.5))
        self.queue_rows = int(getattr(loss, "sinkhorn_queue", 0)) if loss.centering == "sinkhorn" else 0
        if self.queue_rows > 0:  # SwAV's queue of past teacher bottlenecks (state: in the checkpoint)
            self.register_buffer("queue", torch.zeros(self.queue_rows, model.bottleneck_dim))
            self.register_buffer("queue_ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _push_queue(self, z: torch.Tensor) -> None:
        """Newest rows first; an empty queue is filled with copies of ``z`` (Sinkhorn over repeated rows gives
        those rows the same targets as over ``z`` alone), so no host sync is needed to count filled rows."""
        z = z.detach().float().reshape(-1, self.queue.shape[-1])
        fill = z.repeat(-(-self.queue_rows // z.shape[0]), 1)[: self.queue_rows]
        rolled = torch.cat([z, self.queue])[: self.queue_rows]
        self.queue.copy_(torch.where(self.queue_ready, rolled, fill))
        self.queue_ready.fill_(True)

    def forward(self, inputs: StepInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch -> ``(loss [], stats {name: []})``; see the class docstring."""
        g = inputs.views.global_views  # [B, T, 3, G, G]
        local = inputs.views.local_views  # [B, T, V, 3, L, L]
        b, t, v = g.shape[0], g.shape[1], local.shape[2]
        teacher_temp = inputs.values.teacher_temp
        vit = inputs.teacher
        with torch.no_grad():
            out = vit.forward_tracking(g.flatten(0, 1))  # rows b*T + t
            if inputs.cache is not None:
                inputs.cache["teacher_tracking"] = out  # TimeT reads the teacher's patch tokens from here
            t_z = self.teacher_head.bottleneck(out.cls)  # [B*T, Db]
            t_logits = self.teacher_head.prototypes(t_z).unflatten(0, (b, t))  # [B, T, C]
            if self.tracking:
                heads = sample_heads(inputs.generator, b, vit.num_heads, self.objects, g.device,
                                     per_sample=self.per_sample_heads)
                maps = track_objects(gather_frame0(out, b, t), clip_keys(out, b, t), heads,
                                     eps=self.sinkhorn_eps, iters=self.sinkhorn_iters)
                masks = binarise_maps(maps, self.threshold)  # [B, T, k, N]
            else:  # plain DINO (tracking.enabled false): the whole global view, once
                masks = torch.ones(b, t, 1, out.k.shape[-2], dtype=torch.bool, device=g.device)
            masked = mask_views(g, masks, vit.patch_size)  # [B, T, k, 3, G, G]
        k = masked.shape[2]
        s_cls = inputs.student(masked.flatten(0, 2))  # [B*T*k, D]
        s_masked = self.student_head(s_cls).unflatten(0, (b, t, k))  # [B, T, k, C]
        s_local = self.student_head(inputs.student(local.flatten(0, 2))).unflatten(0, (b, t, v))  # [B, T, V, C]
        extra = None
        if self.queue_rows > 0:
            with torch.no_grad():
                if self.training:
                    self._push_queue(t_z)  # this step's rows join first: an empty queue gets their copies
                # the queued rows (this step's included once, as SwAV) scored by the current teacher prototypes
                extra = self.teacher_head.prototypes(self.queue[t_z.shape[0]:])
        q = self.dino.targets(t_logits, teacher_temp, extra)  # [B, T, C]
        s_full = q_full = None
        if self.full_view != "none":  # the whole global view of every frame (loss.full_view, a departure)
            s_full = self.student_head(inputs.student(g.flatten(0, 1))).unflatten(0, (b, t))  # [B, T, C]
            q_full = q.roll(-1, dims=1) if self.full_view == "other_frame" else q  # frame t -> target of t+1
        ce = dora_loss(s_local, s_masked, t_logits, self.dino.center, self.student_temp, teacher_temp,
                       compat_reference=self.compat_reference, targets=q, student_full=s_full, full_targets=q_full,
                       full_weight=self.full_view_weight)
        stats = collapse_stats(q, out.cls, self.dino.center)
        stats.update(head_stats(t_logits, teacher_temp, t_z, self.student_head.g, self.teacher_head.g))
        stats["mask_coverage"] = masks.float().mean().detach()
        # cross-entropy = teacher entropy + KL(teacher || student): the KL is the part the student controls
        stats["kl"] = ce.detach() - stats["teacher_entropy"]
        loss = ce
        if self.koleo_weight > 0:  # per object: the B*T masked views of object j form one group
            reg = koleo_loss(s_cls.unflatten(0, (b * t, k)).transpose(0, 1))
            stats["koleo"] = reg.detach()
            loss = ce + self.koleo_weight * reg
        if self.training:
            self.dino.queue_center(t_logits)
        return loss, stats

    def before_optimizer_step(self, values: StepValues) -> None:
        """DINO's frozen last layer: its gradients are dropped while ``values.freeze_last_layer``."""
        if values.freeze_last_layer:
            for p in self.student_head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, values: StepValues) -> None:
        """Teacher head EMA (``values.momentum``) and the centre update, once per optimizer step."""
        ema_update_(self.teacher_head, self.student_head, values.momentum)
        self.dino.apply_center_update()
