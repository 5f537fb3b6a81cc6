"""Batched k-means in torch (GPU or CPU): many independent problems, each with its own K.

The reference clusters with faiss-CPU ``Kmeans`` (Euclidean, ``niter=50``, ``nredo=5``, seed 1,
random init, trained on at most 256·K sampled points). Here:

- P problems are solved at once: points ``x`` [P, N, D] (``valid`` [P, N] marks padding),
  ``k`` [P] clusters each (``Kmax = max(k)``; centroids beyond ``k[p]`` are masked out);
- k-means++ initialisation (Arthur & Vassilvitskii 2007), ``restarts`` independent runs, the
  one with the lowest inertia kept per problem (faiss ``nredo``);
- at most ``niter`` Lloyd iterations, stopping early at a fixed point (no label changed; checked
  every 5 iterations, one host sync each); an empty cluster keeps its previous centroid (faiss
  splits a large cluster instead);
- distances ``|x|^2 - 2 x.c + |c|^2`` by batched matmul in fp32, computed in chunks of points and
  problems so memory stays below ``budget`` elements;
- seeded with a ``torch.Generator`` on the points' device: same seed, same device -> same result.

Fitting on a subsample and assigning all pixels is the caller's business (``protocol.py``).

K must not exceed a problem's (valid) points: more centroids than points is not a clustering
(k-means++ would have to pick points twice, and a huge K loops for ever); :class:`KMeansError`
says which problem, K and the number of points, before any work.
"""

from __future__ import annotations

import torch

from wtours.errors import UserError


class KMeansError(UserError, ValueError):
    """A k-means problem that cannot be solved as asked (K < 1, more clusters than points).

    A :class:`UserError` (the command line prints one line) and a ``ValueError`` (what library
    callers catch for a bad argument)."""

DEFAULT_BUDGET = 1 << 26  # elements of the largest temporary (256 MiB in fp32)


def _sqdist(x: torch.Tensor, c: torch.Tensor, c2: torch.Tensor | None = None,
            x2: torch.Tensor | None = None) -> torch.Tensor:
    """[P, N, D] x [P, K, D] -> [P, N, K] squared Euclidean distances (clamped at 0)."""
    if c2 is None:
        c2 = (c * c).sum(-1)
    if x2 is None:
        x2 = (x * x).sum(-1)
    d = torch.baddbmm(c2.unsqueeze(1), x, c.transpose(1, 2), beta=1.0, alpha=-2.0)
    return (d + x2.unsqueeze(-1)).clamp_min_(0.0)


def assign(
    x: torch.Tensor,
    centroids: torch.Tensor,
    k: torch.Tensor | None = None,
    budget: int = DEFAULT_BUDGET,
    x2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid per point, chunked over points -> (labels [P, N] int64, sq. dist [P, N]).

    ``centroids`` [P, Kmax, D]; ``k`` [P] masks centroids ``>= k[p]`` (default: all valid);
    ``x2`` [P, N]: precomputed squared norms of the points.
    """
    p, n, _ = x.shape
    kmax = centroids.shape[1]
    c2 = (centroids * centroids).sum(-1)
    if k is not None:
        dead = torch.arange(kmax, device=x.device)[None, :] >= k[:, None]
        c2 = c2.masked_fill(dead, float("inf"))
    if x2 is None:
        x2 = (x * x).sum(-1)
    step = max(1, budget // max(1, p * kmax))
    labels = torch.empty(p, n, dtype=torch.long, device=x.device)
    dists = torch.empty(p, n, dtype=x.dtype, device=x.device)
    for s in range(0, n, step):
        d = _sqdist(x[:, s : s + step], centroids, c2, x2[:, s : s + step])
        dists[:, s : s + step], labels[:, s : s + step] = d.min(-1)
    return labels, dists


def kmeans_pp(
    x: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ seeding for P problems at once -> centroids [P, Kmax, D]."""
    p, n, d = x.shape
    kmax = int(k.max())
    rows = torch.arange(p, device=x.device)
    w = valid.to(x.dtype)
    centroids = torch.zeros(p, kmax, d, dtype=x.dtype, device=x.device)
    idx = torch.multinomial(w, 1, generator=generator).squeeze(1)
    centroids[:, 0] = x[rows, idx]
    best = ((x - centroids[:, :1]) ** 2).sum(-1)
    for j in range(1, kmax):
        prob = best * w
        prob = prob + w * 1e-12 * (prob.sum(1, keepdim=True) <= 0)  # all points on centroids
        idx = torch.multinomial(prob, 1, generator=generator).squeeze(1)
        centroids[:, j] = x[rows, idx]
        best = torch.minimum(best, ((x - centroids[:, j : j + 1]) ** 2).sum(-1))
    return centroids


def _update(x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, kmax: int, budget: int):
    """Per-cluster sums [P, K, D] and counts [P, K] of the weighted points, by one-hot bmm
    (``index_add_`` with many repeated indices is ~100x slower on CPU), chunked over points."""
    p, n, d = x.shape
    sums = torch.zeros(p, kmax, d, dtype=x.dtype, device=x.device)
    counts = torch.zeros(p, kmax, dtype=x.dtype, device=x.device)
    step = max(1, budget // max(1, p * kmax))
    for s in range(0, n, step):
        oh = torch.nn.functional.one_hot(labels[:, s : s + step], kmax).to(x.dtype) * w[:, s : s + step, None]
        sums += torch.bmm(oh.transpose(1, 2), x[:, s : s + step])
        counts += oh.sum(1)
    return sums, counts


def _lloyd(
    x: torch.Tensor, c: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, niter: int, budget: int,
    check_every: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``niter`` Lloyd steps; stops early (one host sync every ``check_every`` steps) once no
    label changes, which is a fixed point: the result equals running all ``niter`` steps."""
    p, n, d = x.shape
    kmax = c.shape[1]
    w = valid.to(x.dtype)
    x2 = (x * x).sum(-1)
    prev = None
    for it in range(niter):
        labels, _ = assign(x, c, k, budget, x2)
        if prev is not None and (it % check_every == 0) and not bool(((labels != prev) & valid).any()):
            break
        prev = labels
        sums, counts = _update(x, labels, w, kmax, budget)
        c = torch.where((counts > 0)[..., None], sums / counts.clamp_min(1.0)[..., None], c)
    _, dist = assign(x, c, k, budget, x2)
    inertia = (dist * w).sum(1)
    return c, inertia


def check_k(k: torch.Tensor, n_points: torch.Tensor) -> None:
    """Raise :class:`KMeansError` unless ``1 <= k[p] <= n_points[p]`` for every problem ``p``."""
    k = k.reshape(-1).cpu()
    n_points = n_points.reshape(-1).cpu().expand(k.shape)
    if k.numel() and int(k.min()) < 1:
        p = int(torch.nonzero(k < 1)[0])
        raise KMeansError(f"k-means: K must be >= 1, got K={int(k[p])}" + (f" for problem {p}" if k.numel() > 1 else ""))
    over = torch.nonzero(k > n_points).flatten()
    if over.numel():
        p = int(over[0])
        raise KMeansError(f"k-means: K={int(k[p])} clusters but only {int(n_points[p])} points to cluster"
                          + (f" (problem {p} of {k.numel()})" if k.numel() > 1 else "")
                          + "; K must be at most the number of points")


def kmeans_fit(
    x: torch.Tensor,
    k: torch.Tensor | int,
    *,
    valid: torch.Tensor | None = None,
    niter: int = 50,
    restarts: int = 5,
    seed: int = 1,
    budget: int = DEFAULT_BUDGET,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit P k-means problems -> (centroids [P, Kmax, D] fp32, inertia [P]).

    ``x`` [P, N, D] (or [N, D] for one problem); ``k`` int or [P]; ``valid`` [P, N] bool.
    Problems are processed in chunks so that no temporary exceeds ``budget`` elements.
    Raises :class:`KMeansError` when a ``k`` is < 1 or above its problem's valid points.
    """
    if x.ndim == 2:
        x = x[None]
        valid = None if valid is None else valid[None]
    x = x.float()
    p, n, d = x.shape
    k_t = torch.as_tensor(k, device=x.device, dtype=torch.long).reshape(-1).expand(p).clone()
    if valid is None:
        valid = torch.ones(p, n, dtype=torch.bool, device=x.device)
    check_k(k_t, valid.sum(1))
    kmax = int(k_t.max())
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seed))
    best_c = torch.zeros(p, kmax, d, dtype=x.dtype, device=x.device)
    best_i = torch.full((p,), float("inf"), dtype=x.dtype, device=x.device)
    per_problem = n * max(d, kmax)
    chunk = max(1, budget // max(1, per_problem))
    for s in range(0, p, chunk):
        xs, ks, vs = x[s : s + chunk], k_t[s : s + chunk], valid[s : s + chunk]
        for _ in range(max(1, restarts)):
            c0 = kmeans_pp(xs, ks, vs, gen)
            c, inertia = _lloyd(xs, c0, ks, vs, niter, budget)
            better = inertia < best_i[s : s + chunk]
            best_i[s : s + chunk] = torch.where(better, inertia, best_i[s : s + chunk])
            best_c[s : s + chunk] = torch.where(better[:, None, None], c, best_c[s : s + chunk])
    return best_c, best_i


def kmeans(
    x: torch.Tensor, k: int, *, niter: int = 50, restarts: int = 5, seed: int = 1, max_points: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One problem: x [N, D] -> (labels [N], centroids [K, D]); fit on ``max_points`` sampled points."""
    fit = x
    if max_points is not None and x.shape[0] > max_points:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(seed) + 7919)
        fit = x[torch.randperm(x.shape[0], generator=gen, device=x.device)[:max_points]]
    c, _ = kmeans_fit(fit, k, niter=niter, restarts=restarts, seed=seed)
    labels, _ = assign(x[None].float(), c)
    return labels[0], c[0]
