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

Shapes: ``q [M, C]`` rows summing to 1, ``cls [M, D]``, ``center [1, C]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KEYS = ("teacher_entropy", "teacher_batch_entropy", "prototypes_used", "center_norm", "feature_std")


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
