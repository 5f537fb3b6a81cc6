"""KoLeo regulariser: spread a batch of features uniformly over the unit sphere.

Reference: A. Sablayrolles, M. Douze, C. Schmid, H. Jégou, "Spreading vectors for similarity
search", ICLR 2019 (the Kozachenko-Leonenko differential-entropy estimator); used on the student's
[CLS] tokens by DINOv2 (M. Oquab et al., TMLR 2024, ``koleo_loss.py``, weight 0.1).

For ``M`` L2-normalised vectors ``x_i`` and ``rho_i = min_{j != i} ||x_i - x_j||``::

    L = -1/M sum_i log(rho_i + eps)

Minimising it pushes every vector away from its nearest neighbour, so a batch cannot collapse
to one point (the failure of DINO on small, low-diversity data: identical features -> identical
teacher logits -> after centring, uniform targets).

Shapes: ``x [..., M, D]`` (leading dims are independent groups, e.g. one per object view) -> scalar
(mean over groups). fp32 inside, autocast off.

Example::

    reg = koleo_loss(student_cls.unflatten(0, (B, k)).transpose(0, 1))   # [k, B, D] -> scalar
    loss = loss + 0.1 * reg

Departure from DINOv2: the nearest neighbour is found with one batched ``cdist`` (DINOv2 uses a
max inner product, equivalent on the unit sphere); groups are vectorised instead of a loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo loss of ``x [..., M, D]`` (``M >= 2`` vectors per group); see the module docstring."""
    if x.dim() < 2 or x.shape[-2] < 2:
        raise ValueError(f"koleo_loss needs [..., M >= 2, D], got {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = F.normalize(x.float(), dim=-1, eps=eps)
        m = z.shape[-2]
        sim = z @ z.transpose(-1, -2)                                   # [..., M, M] cosines
        sim = sim - 3.0 * torch.eye(m, device=z.device, dtype=z.dtype)  # exclude i == j
        nn_sim = sim.amax(dim=-1)                                       # nearest neighbour
        dist = (2.0 - 2.0 * nn_sim).clamp_min(0.0).sqrt()              # ||x_i - x_j|| on the sphere
        return -torch.log(dist + eps).mean()
