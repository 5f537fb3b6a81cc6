"""TimeT: dense self-supervision from time, by forwarding patch cluster maps through a clip.

Reference: M. Salehi, E. Gavves, C. G. M. Snoek, Y. M. Asano, "Time Does Tell: Self-Supervised
Time-Tuning of Dense Image Representations", ICCV 2023 (arXiv 2308.11796). The behaviour of the
reference code (``SMSD75/Timetuning``) is summarised in ``shared/reference/timet.md`` §1; step
numbers below follow §1.3.

Notation: ``B`` clips, ``T`` frames per clip (frame 0 = source frame), ``N = h*w`` patches,
``D`` backbone width, ``E`` head width (256), ``K`` prototypes (200).

One step (all batched over clips and frames; only the recursion over target frames, at most
``T - 1`` small gathers, is a Python loop, because frame ``t`` reads the maps of frames ``< t``)::

    s_t   = head.scores(student_tokens)               # [B, T, N, K]  cos(normalize(head(x)), P)
    q0    = sinkhorn_knopp(teacher_scores[:, 0])      # [B, N, K]     SK over all first-frame patches
    maps  = forward_labels(q0, feats, grid)           # [B, T, K, N]  the feature forwarder
    y     = maps.argmax(K)                            # hard labels of the propagated maps
    loss  = CE(s_t / tau, y)                          # on the last frame, or on every frame > 0

**Feature forwarder** (:func:`forward_labels`, reference ``mask_propagation.propagate_labels``):
target frame ``t`` reads from context frames ``{0} + {max(1, t - n_last) .. t - 1}`` (frame 0 with
its SK map, and up to ``n_last`` previously propagated frames); the affinity of target patch
``i`` to context patch ``j`` is ``exp(cos(f_i, f_j) / 0.1)`` on L2-normalised, detached backbone
tokens, zeroed outside a ``(2r+1) x (2r+1)`` spatial window; per target patch only the ``topk``
largest affinities over *all* context patches of all context frames are kept and normalised to
sum 1; the target's map is that convex combination of the context maps.

Memory of the affinity: ``B * (T-1) * N * T * N`` fp32 values (every target frame against every
frame; the ones outside its context are zeroed). At ViT-S/16, 224 px (N = 196), T = 8, B = 16:
16 * 7 * 196 * 8 * 196 = 34.4 M values = 138 MB, plus one temporary of that size for the masking;
:func:`forward_labels` processes clips in chunks of at most ``max_elements`` (default 2^27 = 134 M)
affinity values, so a larger batch or resolution stays within ~0.5 GB + 0.5 GB.

Shapes: see each function.

Departures from the reference code (flags where the reference must be reproducible):
  * batched over clips and frames in fp32 (the reference loops over clips in Python and
    propagates in float64); the maps are convex combinations, so fp32 loses nothing that matters
    (test: equal to a float64 per-clip transcription to 1e-5).
  * top-k keeps exactly ``topk`` sources (the reference keeps every source >= the k-th value, so
    ties can keep more); ties between distinct float affinities do not happen in practice.
  * the EMA teacher is a real EMA (``teacher <- m * teacher + (1 - m) * student``); the reference
    swaps the roles (``teacher <- (1 - m) * teacher + m * student``), so its "teacher" is the
    student of < 0.5 % ago: :func:`timet_ema_update_` with ``compat_reference=True`` reproduces it.
  * the loss may use every frame after the first (``loss_frames="all"``, default: the maps of
    frames 1..T-2 are computed by the recursion anyway, and each adds N targets per clip at no
    extra network cost); ``"last"`` is the reference.
  * Sinkhorn-Knopp in the log domain (:mod:`wtours.objectives.sinkhorn`), all-reduced across ranks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from wtours.models.heads import TimeTHead  # noqa: F401 - TimeT's head lives with the other heads
from wtours.objectives.sinkhorn import sinkhorn_knopp

__all__ = ["TimeTHead", "window_mask", "context_frames", "forward_labels", "timet_targets", "timet_loss",
           "timet_ema_update_"]


# ----------------------------------------------------------------------------- the feature forwarder

def window_mask(h: int, w: int, radius: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[N, N]`` bool: source patch ``j`` lies within ``radius`` rows and columns of target ``i``
    (``radius <= 0``: every pair)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    if radius <= 0:
        return torch.ones(h * w, h * w, dtype=torch.bool, device=device)
    return ((ys[:, None] - ys[None, :]).abs() <= radius) & ((xs[:, None] - xs[None, :]).abs() <= radius)


def context_frames(T: int, n_last: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[T, T]`` bool: ``[t, c]`` = frame ``c`` is a context frame of target ``t`` (frame 0 and the
    ``n_last`` frames before ``t``, never ``t`` itself; row 0 is empty: frame 0 is the source)."""
    t = torch.arange(T, device=device)[:, None]
    c = torch.arange(T, device=device)[None, :]
    recent = (c >= 1) & (c < t) & (c >= t - n_last)
    return ((c == 0) & (t > 0)) | recent


def forward_labels(maps0: torch.Tensor, feats: torch.Tensor, grid: tuple[int, int], n_last: int = 7,
                   radius: int = 6, topk: int = 5, temperature: float = 0.1,
                   max_elements: int = 1 << 27) -> torch.Tensor:
    """Forward the soft maps of frame 0 through the clip (the feature forwarder).

    Args:
        maps0: ``[B, K, N]`` soft maps of frame 0 (e.g. Sinkhorn-Knopp assignments, rows over K).
        feats: ``[B, T, N, D]`` backbone patch tokens of every frame (used detached, normalised here).
        grid: ``(h, w)`` with ``h * w = N``.
        n_last: previously propagated frames in the context (reference 7), besides frame 0.
        radius: spatial window in patches (reference 6); ``<= 0``: no window.
        topk: sources kept per target patch (reference 5).
        temperature: affinity temperature (reference 0.1).
        max_elements: affinity values per chunk of clips (memory bound; see the module docstring).

    Returns:
        ``[B, T, K, N]`` fp32 maps; frame 0 is ``maps0``; every later column is a convex
        combination of context columns (sums over K are preserved).
    """
    B, T, N, _ = feats.shape
    h, w = grid
    if h * w != N or maps0.shape[0] != B or maps0.shape[-1] != N:
        raise ValueError(f"maps0 {tuple(maps0.shape)} / feats {tuple(feats.shape)} do not match grid {grid}")
    per_clip = max(1, (T - 1) * N * T * N)
    step = max(1, max_elements // per_clip)
    outs = [_forward_chunk(maps0[i:i + step], feats[i:i + step], grid, n_last, radius, topk, temperature)
            for i in range(0, B, step)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _forward_chunk(maps0: torch.Tensor, feats: torch.Tensor, grid: tuple[int, int], n_last: int, radius: int,
                   topk: int, temperature: float) -> torch.Tensor:
    B, T, N, _ = feats.shape
    K = maps0.shape[1]
    dev = feats.device
    with torch.no_grad(), torch.autocast(device_type=dev.type, enabled=False):
        f = F.normalize(feats.detach().float(), dim=-1)
        # affinity of every target frame t >= 1 to every frame c: [B, T-1, N, T, N]
        aff = torch.exp(torch.einsum("btnd,bcmd->btncm", f[:, 1:], f) / temperature)
        keep = window_mask(*grid, radius, dev)[None, None, :, None, :] \
            & context_frames(T, n_last, dev)[1:, None, :, None].unsqueeze(0)            # [1, T-1, N, T, N]
        aff = torch.where(keep, aff, torch.zeros((), device=dev))
        k = min(topk, T * N)
        val, idx = aff.flatten(-2).topk(k, dim=-1)                                     # [B, T-1, N, k]
        val = val / val.sum(-1, keepdim=True).clamp_min(1e-30)
        src_frame, src_patch = idx // N, idx % N
        maps = maps0.float().new_zeros(B, T, K, N)
        maps[:, 0] = maps0.float()
        bi = torch.arange(B, device=dev)[:, None, None]
        for t in range(1, T):  # recursion: frame t reads frames < t (at most T - 1 gathers)
            src = maps[bi, src_frame[:, t - 1], :, src_patch[:, t - 1]]                 # [B, N, k, K]
            maps[:, t] = torch.einsum("bnk,bnkc->bcn", val[:, t - 1], src)
        return maps


# ----------------------------------------------------------------------------- targets and loss

def timet_targets(teacher_scores0: torch.Tensor, eps: float = 0.05, iters: int = 10) -> torch.Tensor:
    """Sinkhorn-Knopp soft maps of frame 0: ``[B, N, K]`` cosines -> ``[B, K, N]`` (each patch's
    column sums to 1 over K; every prototype gets an equal share of all first-frame patches of the
    batch, across ranks). fp32, no grad."""
    B, N, K = teacher_scores0.shape
    with torch.no_grad():
        q = sinkhorn_knopp(teacher_scores0.detach().reshape(B * N, K), eps=eps, iters=iters, across_ranks=True)
    return q.reshape(B, N, K).transpose(1, 2)


def timet_loss(student_scores: torch.Tensor, maps: torch.Tensor, temperature: float = 0.1,
               frames: Literal["last", "all"] = "all") -> torch.Tensor:
    """Cross-entropy of the student's scores against the argmax of the forwarded maps.

    Args:
        student_scores: ``[B, T, N, K]`` student cosines to the prototypes (with grad).
        maps: ``[B, T, K, N]`` forwarded maps (:func:`forward_labels`; frame 0 is never a target).
        temperature: ``tau`` of ``softmax(s / tau)`` (reference 0.1).
        frames: ``"last"`` (reference: frame ``T-1`` only) or ``"all"`` (frames ``1..T-1``).

    Returns: scalar, the mean over target patches (and clips, frames), fp32.
    """
    if student_scores.dim() != 4 or maps.dim() != 4 or student_scores.shape[:2] != maps.shape[:2] \
            or student_scores.shape[2] != maps.shape[3] or student_scores.shape[3] != maps.shape[2]:
        raise ValueError(f"student scores {tuple(student_scores.shape)} must be [B, T, N, K] for maps "
                         f"{tuple(maps.shape)} [B, T, K, N]")
    if student_scores.shape[1] < 2:
        raise ValueError("TimeT needs clips of at least 2 frames")
    sel = slice(-1, None) if frames == "last" else slice(1, None)
    y = maps[:, sel].argmax(dim=2)                                                    # [B, T', N]
    s = student_scores[:, sel].float() / temperature                                   # [B, T', N, K]
    with torch.autocast(device_type=s.device.type, enabled=False):
        return F.cross_entropy(s.flatten(0, 2), y.flatten())


@torch.no_grad()
def timet_ema_update_(teacher: nn.Module, student: nn.Module, momentum: float, compat_reference: bool = False) -> None:
    """EMA of every parameter: ``t <- m t + (1 - m) s``; ``compat_reference`` reproduces the
    reference's swapped weights ``t <- (1 - m) t + m s`` (timet.md §1.4). Prototypes of a
    :class:`TimeTHead` in ``teacher`` are renormalised afterwards, as the reference does."""
    a = (1.0 - momentum) if compat_reference else momentum
    tp = [p for p in teacher.parameters()]
    sp = [p.detach() for p in student.parameters()]
    if len(tp) != len(sp):
        raise ValueError("teacher and student have different parameter lists")
    torch._foreach_mul_(tp, a)
    torch._foreach_add_(tp, sp, alpha=1.0 - a)
    for m in teacher.modules():
        if isinstance(m, TimeTHead):
            m.renormalize_()


# ----------------------------------------------------------------------------- as a stage-1 objective

class TimeTObjective(nn.Module):
    """TimeT as a stage-1 objective (:class:`wtours.objectives.interface.Objective`).

    Owns the TimeT head with its prototypes (``student_head`` trained, ``teacher_head`` its EMA).
    One call on :class:`~wtours.objectives.interface.StepInputs` of ``B`` clips of ``T`` frames
    (global views ``[B, T, 3, G, G]``, the same crop box for every frame of a clip):

    1. student backbone, **one call** on the ``B*T`` global views -> patch tokens ``[B, T, N, D]``
       -> ``student_head.scores`` ``[B, T, N, K]``;
    2. teacher patch tokens of the same views (shared with DoRA's teacher pass when both objectives
       run, through ``inputs.cache``), ``teacher_head.scores`` of frame 0 -> Sinkhorn-Knopp -> ``[B, K, N]``;
    3. :func:`forward_labels` on the detached student (reference) or teacher tokens -> ``[B, T, K, N]``;
    4. :func:`timet_loss` on the last frame or every frame after the first.

    Stats: ``timet_loss``, ``timet_labels`` (distinct forwarded labels in the batch, out of ``K``: near 1
    = collapsed), ``timet_source_entropy`` (mean entropy of frame 0's Sinkhorn maps, nats).

    Args:
        embed_dim: the backbone's width ``D``.
        cfg: the ``timet`` section of :class:`wtours.stages.video.config.VideoPretrainConfig`.
    """

    def __init__(self, embed_dim: int, cfg) -> None:
        super().__init__()
        import copy

        self.cfg = cfg
        self.student_head = TimeTHead(embed_dim, tuple(cfg.head_hidden), cfg.head_out, cfg.prototypes)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)

    def forward(self, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        g = inputs.views.global_views  # [B, T, 3, G, G]
        b, t = g.shape[:2]
        grid = inputs.student.grid(g.shape[-2], g.shape[-1])
        s_tok = inputs.student.forward_patches(g.flatten(0, 1)).unflatten(0, (b, t))  # [B, T, N, D]
        with torch.no_grad():
            cached = inputs.cache.get("teacher_tracking") if inputs.cache is not None else None
            t_tok = (cached.patches if cached is not None else inputs.teacher.forward_patches(g.flatten(0, 1)))
            t_tok = t_tok.unflatten(0, (b, t))
            q0 = timet_targets(self.teacher_head.scores(t_tok[:, 0]), eps=c.sinkhorn_eps, iters=c.sinkhorn_iters)
            feats = s_tok.detach() if c.forwarder_features == "student" else t_tok
            maps = forward_labels(q0, feats, grid, n_last=c.context_frames, radius=c.window, topk=c.topk,
                                  temperature=c.affinity_temp)
        loss = timet_loss(self.student_head.scores(s_tok), maps, c.temperature, c.loss_frames)
        with torch.no_grad():
            labels = maps[:, 1:].argmax(2).flatten()
            used = torch.zeros(maps.shape[2], device=maps.device).index_fill_(0, labels, 1.0).sum()
            ent = -(q0 * q0.clamp_min(1e-12).log()).sum(1).mean()
        return loss, {"timet_loss": loss.detach(), "timet_labels": used, "timet_source_entropy": ent}

    def before_optimizer_step(self, values) -> None:
        """Nothing is frozen by TimeT itself."""

    @torch.no_grad()
    def after_optimizer_step(self, values) -> None:
        """Prototypes back to unit rows, then the teacher head's EMA (``compat_reference``: swapped)."""
        self.student_head.renormalize_()
        timet_ema_update_(self.teacher_head, self.student_head, values.momentum, self.cfg.compat_reference)
