"""Collapse monitors of DINO-style self-distillation, as a practitioner watches them.

DINO (Caron et al., ICCV 2021, §5.3 and Fig. 7) avoids two trivial solutions: one prototype for
every input (*dominant-dimension* collapse: centring prevents it) and the same flat distribution for
every input (*uniform* collapse: sharpening prevents it). On small, low-diversity data the second
one wins: the features of a batch become alike, the centre absorbs what they share, and the
targets flatten towards ``log C`` nats. These statistics show it early; all are tensors (no host
sync), computed under ``no_grad`` from what a training step already has.

====================  =====================================================================
key                   meaning (healthy -> collapsing)
====================  =====================================================================
``teacher_entropy``   mean entropy of the teacher targets ``q`` (nats; low -> ``log C``)
``teacher_batch_entropy`` entropy of the batch-mean target (high; equal to the above = every row alike)
``prototypes_used``   distinct argmax prototypes in the batch (many -> 1, or all rows alike)
``center_norm``       L2 norm of the DINO centre (grows when one direction dominates)
``feature_std``       std over the batch of the L2-normalised teacher [CLS], mean over dims,
                      times sqrt(D): ~1 for spread features, -> 0 when every input maps alike
====================  =====================================================================

:func:`head_stats` adds what explains a uniform collapse of the targets (the targets see the teacher's
logits divided by its temperature ``tau_t``; with the same logits for every row they are uniform,
whatever the centring):

========================  =================================================================
key                       meaning (healthy -> collapsing)
========================  =================================================================
``teacher_logit_range``   mean over rows of (max - min) of the teacher logits / ``tau_t``
                          (tens -> ~0: flat rows)
``teacher_logit_spread``  std over the batch rows of each teacher logit / ``tau_t``, mean over
                          prototypes (> 1 -> ~0: every input gets the same logits)
``bottleneck_rank``       effective rank (RankMe: exp of the entropy of the normalised singular
                          values) of the teacher head's L2-normalised bottleneck over the batch
                          (many -> 1: the head maps every input alike)
``head_g``                mean weight-norm magnitude ``g`` of the student's prototypes layer
                          (each logit lies in ``[-g, g]``; -> 0 flattens every target)
``teacher_head_g``        the same for the teacher (EMA) head: what scales the targets
========================  =================================================================

Shapes: ``q [M, C]`` rows summing to 1, ``cls [M, D]``, ``center [1, C]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KEYS = ("teacher_entropy", "teacher_batch_entropy", "prototypes_used", "center_norm", "feature_std")
HEAD_KEYS = ("teacher_logit_range", "teacher_logit_spread", "bottleneck_rank", "head_g", "teacher_head_g")


@torch.no_grad()
def collapse_stats(q: torch.Tensor, cls: torch.Tensor, center: torch.Tensor) -> dict[str, torch.Tensor]:
    """The monitors of the module docstring (0-dim fp32 tensors, on ``q``'s device)."""
    q = q.detach().float().reshape(-1, q.shape[-1])
    ent = -(q * q.clamp_min(1e-12).log()).sum(-1).mean()
    qm = q.mean(0)
    batch_ent = -(qm * qm.clamp_min(1e-12).log()).sum()
    hits = torch.zeros(q.shape[-1], device=q.device).index_fill_(0, q.argmax(-1), 1.0)
    z = F.normalize(cls.detach().float().reshape(-1, cls.shape[-1]), dim=-1)
    std = z.std(dim=0, unbiased=False).mean() * math.sqrt(z.shape[-1]) if z.shape[0] > 1 else z.new_zeros(())
    return {"teacher_entropy": ent, "teacher_batch_entropy": batch_ent, "prototypes_used": hits.sum(),
            "center_norm": center.detach().float().norm(), "feature_std": std}


@torch.no_grad()
def effective_rank(x: torch.Tensor) -> torch.Tensor:
    """RankMe (Garrido et al., ICML 2023) of ``x [M, D]``: ``exp(-sum p_i log p_i)`` with ``p = sigma / sum sigma``
    over the singular values; 1 for rank-one rows, ``min(M, D)`` for orthogonal rows of equal norm. fp32."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    s = torch.linalg.svdvals(x)
    p = s / s.sum().clamp_min(1e-12)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


@torch.no_grad()
def head_stats(teacher_logits: torch.Tensor, teacher_temp: float | torch.Tensor, bottleneck: torch.Tensor,
               student_g: torch.Tensor, teacher_g: torch.Tensor) -> dict[str, torch.Tensor]:
    """The head monitors of the module docstring: ``teacher_logits [..., C]``, the teacher head's bottleneck
    ``[..., Db]`` (before normalisation), the prototypes layers' magnitudes ``g`` (any shape)."""
    t = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]) / teacher_temp
    rng = (t.amax(-1) - t.amin(-1)).mean()
    spread = t.std(dim=0, unbiased=False).mean() if t.shape[0] > 1 else t.new_zeros(())
    z = F.normalize(bottleneck.detach().float().reshape(-1, bottleneck.shape[-1]), dim=-1)
    return {"teacher_logit_range": rng, "teacher_logit_spread": spread, "bottleneck_rank": effective_rank(z),
            "head_g": student_g.detach().float().mean(), "teacher_head_g": teacher_g.detach().float().mean()}
