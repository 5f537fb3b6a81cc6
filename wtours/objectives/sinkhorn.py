"""Sinkhorn-Knopp equipartition of patches among prototypes (entropic optimal transport).

References:
  * M. Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport", NeurIPS 2013.
  * S. Venkataramanan et al., "Is ImageNet worth 1 video? Learning strong image encoders from
    1 long unlabelled video", ICLR 2024 (DoRA), eqs. 4-6: patches of frame 0 are assigned to
    k object prototypes with SK (eps 0.05, 30 iterations) before tracking.

Semantics (identical to DoRA's reference ``SinkhornKnopp``, see ``shared/reference/dora.md`` §3):
given similarity scores ``S[..., n, k]`` (patches x objects), start from ``exp(S / eps)`` and
alternate, ``iters`` times, (a) rescale every object column to total ``1/K`` and (b) rescale
every patch row to total ``1/N``; finally multiply by ``N``. The result ``M`` has

  * rows (patches) summing to exactly 1 (the last step is a row normalisation), and
  * columns (objects) summing to ~ ``N / K`` (equipartition; exact only at convergence).

Relation to POT: at convergence ``M = N * ot.sinkhorn(a, b, -S, reg=eps)`` with
``a = full(N, 1/N)``, ``b = full(K, 1/K)`` (the plan of the entropic OT problem with cost
``-S``; ``method="sinkhorn_log"`` for small eps). With a fixed small number of iterations the
two agree only up to the not-yet-converged column marginals.

Shapes: ``scores`` ``[..., N, K]`` (any leading batch dims) -> ``[..., N, K]`` float32.

Example::

    Z = F.normalize(patches, dim=-1)            # [B, N, D]
    M = sinkhorn_knopp(Z @ P.transpose(1, 2))   # [B, N, K]; M.sum(-1) == 1, M.sum(-2) ~ N/K

Departures from the reference code:
  * log-domain iterations in float32 with autocast disabled (the reference works in the
    exponential domain, in the input dtype, after subtracting the per-sample max); the two are
    equal in exact arithmetic, ours cannot underflow a whole row to 0 and produce NaN.
  * non-finite scores are replaced without host syncs (``torch.where``): +inf and NaN by the
    per-sample maximum finite score, -inf by the per-sample minimum. The reference's
    ``shoot_infs`` replaces +-inf by the maximum with a Python loop over ``nonzero`` indices.
  * fixed iteration count and no data-dependent control flow (safe under CUDA graphs /
    ``torch.compile``).
"""

from __future__ import annotations

import math

import torch

_FLOOR = -1e30  # finite stand-in for -inf in log space (keeps every logsumexp finite)


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Replace non-finite entries per matrix (last two dims) without host syncs."""
    finite = torch.isfinite(x)
    big = torch.finfo(x.dtype).max
    hi = torch.where(finite, x, torch.full_like(x, -big)).amax(dim=(-2, -1), keepdim=True)
    lo = torch.where(finite, x, torch.full_like(x, big)).amin(dim=(-2, -1), keepdim=True)
    # A matrix with no finite entry at all gets hi=-big, lo=big: fall back to zeros (uniform plan).
    none = ~finite.flatten(-2).any(-1)[..., None, None]
    hi = torch.where(none, torch.zeros_like(hi), hi)
    lo = torch.where(none, torch.zeros_like(lo), lo)
    x = torch.where(x == float("-inf"), lo, x)
    return torch.where(torch.isfinite(x), x, hi)  # +inf and NaN


def sinkhorn_knopp(scores: torch.Tensor, eps: float = 0.05, iters: int = 30,
                   across_ranks: bool = False) -> torch.Tensor:
    """Equipartition assignment of ``N`` rows (patches) to ``K`` columns (objects).

    Args:
        scores: ``[..., N, K]`` similarities (higher = more likely assigned); any float dtype.
        eps: entropic regularisation (temperature of ``exp(scores / eps)``).
        iters: number of (column, row) normalisation rounds, fixed.
        across_ranks: the rows of all ranks form one problem (SwAV / TimeT: each rank holds a
            shard of the batch's patches); the column sums and ``N`` are all-reduced (two
            collectives per round, on the device). A no-op in a single process.

    Returns:
        ``[..., N, K]`` float32, no grad history needed (callers use it as a hard target);
        each row sums to 1, each column to ~``N / K``.
    """
    if scores.dim() < 2:
        raise ValueError(f"scores must be [..., N, K], got shape {tuple(scores.shape)}")
    if eps <= 0 or iters < 1:
        raise ValueError(f"need eps > 0 and iters >= 1, got eps={eps}, iters={iters}")
    from wtours.objectives.distributed import world_size

    shared = across_ranks and world_size() > 1
    n, k = scores.shape[-2], scores.shape[-1]
    log_n, log_k = math.log(n * (world_size() if shared else 1)), math.log(k)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        x = _finite(scores.float())
        x = x - x.amax(dim=(-2, -1), keepdim=True)  # <= 0, may overflow to -inf for huge spreads
        logq = torch.nan_to_num(x / eps, nan=_FLOOR, neginf=_FLOOR).clamp_min(_FLOOR)
        for _ in range(iters):
            col = torch.logsumexp(logq, dim=-2, keepdim=True)
            if shared:
                col = _logsumexp_over_ranks(col)
            logq = logq - (col + log_k)  # columns -> 1/K
            logq = logq - (torch.logsumexp(logq, dim=-1, keepdim=True) + log_n)  # rows -> 1/N
        return torch.exp(logq + log_n)


def _logsumexp_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``log(sum over ranks of exp(x))``, elementwise, without overflow (max + sum all-reduce)."""
    import torch.distributed as dist

    m = x.detach().clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    s = torch.exp(x - m)
    dist.all_reduce(s, op=dist.ReduceOp.SUM)
    return m + torch.log(s)
