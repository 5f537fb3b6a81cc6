"""F / C / D clustering protocols and overclustering (TimeT ``evaluation.py`` + ``clustering.py``).

Paper: M. Salehi, E. Gavves, C. Snoek, Y. Asano, "Time Does Tell: Self-Supervised Time-Tuning of
Dense Image Representations", ICCV 2023 (arXiv 2308.11796); the protocol as read from the
reference code is in ``../shared/reference/timet.md`` §2.

Pools and what is matched (timet.md §2.4):

- **F** (frame-wise): k-means on each frame alone, K = #labels in the frame, Hungarian per frame;
  score = mean over frames of the frame's mIoU.
- **C** (clip-wise): k-means on all frames of a clip jointly, K = #labels in the clip, one
  Hungarian mapping per clip; score = mean over clips.
- **D** (dataset-wise): one k-means over all frames, K = #labels in the dataset, one Hungarian
  mapping; one mIoU (computed at ``eval_size_dataset``, 112² by default as in the reference).
- **Overclustering**: dataset-wise k-means with a fixed K (100, 300, 500, ...) and many-to-one
  majority matching.

Features: per pool, standardise (z-score, population std) then PCA to ``pca_dim`` (faiss
``PCAMatrix``: centred, no whitening). The reference fits F / C's scaler + PCA on one loader batch
of 16 videos, an arbitrary grouping; here they are fitted per clip (``pca_scope="clip"``, default),
per batch of ``batch_videos`` consecutive videos of the list (``"batch"``, the reference's), or on the
whole dataset, and D always on the whole dataset, as in the reference. The F and C scores are means
over all frames / clips (``score_average="all"``), or, as the reference reports them, means per batch
of ``batch_videos`` videos and then over batches (``"batch"``; the last, smaller batch weighs as much).

Per-pixel clustering without per-pixel features: the protocol clusters the 50-d features
bilinearly upsampled to the GT size. k-means is *fitted* on at most
``max_points_per_centroid * K`` pixels per pool (faiss trains on 256·K points too), whose
features are interpolated exactly at the sampled pixels (the same weights as
``F.interpolate(bilinear, align_corners=False)``). *Assignment* needs, per pixel, the argmin over
centroids of ``|c|^2 - 2 x.c``; since bilinear upsampling is linear with weights summing to 1 this
equals the argmin of the *upsampled* patch-level scores, which is cheaper when K < D. Either way it
runs in chunks of frames, so the dataset's features are never upsampled at once. The confusion
matrices are accumulated by ``bincount`` per chunk.

``cluster_at="patch"`` (flagged, not the protocol) fits k-means on the patch tokens instead of
sampled pixels; assignment stays per pixel.

Reference bugs not reproduced: the Pascal-only ``x255`` / drop-255 lines that discard label 1 in
D (§2.5); random frame sampling; unseeded PCA pools.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wtours.errors import UserError
from wtours.eval.features import FeatureSet
from wtours.eval.kmeans import kmeans_fit
from wtours.eval.metrics import match_confusion

IGNORE = 255


# ----------------------------------------------------------------------------- features
def _standardize(x: torch.Tensor, standardize: bool) -> torch.Tensor:
    z = x.float() - x.float().mean(0, keepdim=True)
    if standardize:
        std = z.pow(2).mean(0, keepdim=True).sqrt()  # population std, as sklearn's StandardScaler
        z = z / torch.where(std > 0, std, torch.ones_like(std))
    return z


def _top_components(covs: torch.Tensor, dim: int) -> torch.Tensor:
    """[G, D, D] fp64 covariances -> [G, D, dim] leading eigenvectors (batched; LAPACK on CPU,
    where torch's threaded eigh is erratic on busy machines)."""
    if covs.device.type == "cpu":
        _, vecs = np.linalg.eigh(covs.numpy())
        vecs = torch.from_numpy(vecs)
    else:
        _, vecs = torch.linalg.eigh(covs)  # ascending eigenvalues
    return vecs[..., -dim:].flip(-1)


def standardize_pca(x: torch.Tensor, dim: int, standardize: bool = True) -> torch.Tensor:
    """[M, D] -> [M, min(dim, D)] (z-score per dim, then PCA; fp64 eigh). dim=0: no PCA."""
    z = _standardize(x, standardize)
    if dim <= 0:
        return z
    cov = (z.T @ z).double() / max(1, z.shape[0])
    comps = _top_components(cov[None], min(dim, z.shape[1]))[0]
    return z @ comps.to(z)


def reduce_grid(grid: torch.Tensor, groups: torch.Tensor | None, dim: int, standardize: bool) -> torch.Tensor:
    """Standardise + PCA the [NF, D, h, w] grid, fitted per group of frames (``groups`` [NF],
    contiguous ids; ``None``: one group) -> [NF, d, h, w]. One batched eigh for all groups."""
    nf, d, h, w = grid.shape
    tokens = grid.permute(0, 2, 3, 1).reshape(nf, h * w, d)
    bounds = [(0, nf)] if groups is None else _runs(groups)
    zs = [_standardize(tokens[a:b].reshape(-1, d), standardize) for a, b in bounds]
    if dim > 0:
        covs = torch.stack([(z.T @ z).double() / max(1, z.shape[0]) for z in zs])  # fp32 matmul, fp64 eigh
        comps = _top_components(covs, min(dim, d)).to(grid.dtype)
        zs = [z @ c for z, c in zip(zs, comps)]
    out = torch.cat([z.reshape(b - a, h * w, -1) for z, (a, b) in zip(zs, bounds)])
    return out.reshape(nf, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _runs(groups: torch.Tensor) -> list[tuple[int, int]]:
    """Start / end of each run of equal consecutive values of a 1-D tensor."""
    g = groups.cpu().numpy()
    cut = np.flatnonzero(np.diff(g)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(g)]])
    return list(zip(starts.tolist(), ends.tolist()))


# ----------------------------------------------------------------------------- pools
@dataclass
class Pools:
    """P pools of consecutive frames: ``start`` / ``count`` [P], ``k`` [P] clusters, and the pool
    of each frame ``frame_pool`` [NF]."""

    start: torch.Tensor
    count: torch.Tensor
    k: torch.Tensor
    frame_pool: torch.Tensor

    @staticmethod
    def from_groups(groups: torch.Tensor, k: torch.Tensor) -> "Pools":
        runs = _runs(groups)
        dev = groups.device
        start = torch.tensor([a for a, _ in runs], device=dev)
        count = torch.tensor([b - a for a, b in runs], device=dev)
        frame_pool = torch.repeat_interleave(torch.arange(len(runs), device=dev), count)
        return Pools(start, count, k.to(dev).long(), frame_pool)


def bilinear_points(grid: torch.Tensor, f: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
                    out_hw: tuple[int, int], flat: torch.Tensor | None = None) -> torch.Tensor:
    """Features of pixels (f, y, x) of ``grid`` [NF, D, h, w] upsampled to ``out_hw`` -> [..., D],
    with exactly the weights of ``F.interpolate(mode="bilinear", align_corners=False)``.
    ``flat``: the grid as [NF*h*w, D] (channels last) if already made."""
    nf, d, h, w = grid.shape
    H, W = out_hw
    if flat is None:
        flat = grid.permute(0, 2, 3, 1).reshape(-1, d)

    def axis(v, n_in, n_out):
        s = ((v.double() + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
        i0 = s.floor().long().clamp_max(n_in - 1)
        i1 = (i0 + 1).clamp_max(n_in - 1)
        return i0, i1, (s - i0).to(grid.dtype).clamp(0, 1)

    y0, y1, wy = axis(y, h, H)
    x0, x1, wx = axis(x, w, W)
    base = f * (h * w)

    def at(yy, xx):
        return flat[base + yy * w + xx]

    wy, wx = wy[..., None], wx[..., None]
    return (at(y0, x0) * (1 - wy) * (1 - wx) + at(y0, x1) * (1 - wy) * wx
            + at(y1, x0) * wy * (1 - wx) + at(y1, x1) * wy * wx)


def sample_points(grid: torch.Tensor, pools: Pools, hw: tuple[int, int], points_per_centroid: int,
                  gen: torch.Generator, flat: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fitting points of every pool -> (x [P, n, D], valid [P, n]).

    A pool of ``count * H * W`` pixels gets ``min(size, points_per_centroid * k)`` points: all of
    them when it is small enough, otherwise drawn uniformly (with replacement)."""
    H, W = hw
    size = pools.count * (H * W)
    cap = pools.k * points_per_centroid
    n_p = torch.minimum(size, cap)
    n = int(n_p.max())
    ar = torch.arange(n, device=size.device)[None, :]
    u = torch.rand(len(size), n, generator=gen, device=size.device, dtype=torch.float64)
    rand = (u * size[:, None]).long().clamp_max(size[:, None] - 1)
    idx = torch.where((size <= cap)[:, None], ar.clamp_max(size[:, None] - 1), rand)
    valid = ar < n_p[:, None]
    f = pools.start[:, None] + idx // (H * W)
    r = idx % (H * W)
    return bilinear_points(grid, f, r // W, r % W, hw, flat), valid


def assign_confusion(grid: torch.Tensor, centroids: torch.Tensor, pools: Pools, gt: torch.Tensor,
                     n_labels: int, frame_block: torch.Tensor, n_blocks: int, budget: int,
                     keep: set[int] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Assign every pixel at ``gt``'s size to its pool's nearest centroid, in chunks of frames.

    ``centroids`` [P, K, D]; ``gt`` [NF, H, W] uint8 compact labels (255 ignore); ``frame_block``
    [NF] non-decreasing block id of each frame. Returns (``conf`` [n_blocks, G, K] int64, the
    predictions [H, W] of the frames in ``keep``)."""
    nf, d, h, w = grid.shape
    H, W = gt.shape[-2:]
    k_max = centroids.shape[1]
    dead = torch.arange(k_max, device=grid.device)[None, :] >= pools.k[:, None]
    c2_all = (centroids * centroids).sum(-1).masked_fill(dead, float("inf"))  # [P, K]
    conf = torch.zeros(n_blocks * n_labels * k_max, dtype=torch.long, device=grid.device)
    step = max(1, budget // (max(k_max, d) * H * W))
    kept: dict[int, torch.Tensor] = {}
    for s in range(0, nf, step):
        e = min(nf, s + step)
        pool = pools.frame_pool[s:e]
        c = centroids[pool]  # [t, K, D]
        g = grid[s:e]
        if k_max <= d:
            dots = torch.einsum("tdhw,tkd->tkhw", g, c)
            dots = F.interpolate(dots, size=(H, W), mode="bilinear", align_corners=False)
        else:
            up = F.interpolate(g, size=(H, W), mode="bilinear", align_corners=False)
            dots = torch.einsum("tdhw,tkd->tkhw", up, c)
        pred = (c2_all[pool][:, :, None, None] - 2 * dots).argmin(1)  # [t, H, W]
        lab = gt[s:e].long()
        blk = frame_block[s:e]
        b0 = int(blk[0])
        nb = int(blk[-1]) - b0 + 1
        idx = ((blk - b0)[:, None, None] * n_labels + lab) * k_max + pred
        idx = torch.where(lab != IGNORE, idx, torch.full_like(idx, nb * n_labels * k_max))
        part = torch.bincount(idx.reshape(-1), minlength=nb * n_labels * k_max + 1)[:-1]
        conf[b0 * n_labels * k_max : (b0 + nb) * n_labels * k_max] += part
        if keep:
            for i in range(s, e):
                if i in keep:
                    kept[i] = pred[i - s].to(torch.uint8 if k_max <= 255 else torch.int16).cpu()
    return conf.view(n_blocks, n_labels, k_max), kept


# ----------------------------------------------------------------------------- protocol
@dataclass
class Labels:
    """Compact labels: raw ids [G] and per-size compact GT maps / presence [NF, G]."""

    raw: np.ndarray
    gt: dict[tuple[int, int], torch.Tensor]
    present: dict[tuple[int, int], torch.Tensor]


def compact_labels(feats: FeatureSet) -> Labels:
    dev = feats.grid.device
    counts = sum(torch.bincount(g.reshape(-1).long(), minlength=256) for g in feats.gt.values())
    counts[IGNORE] = 0
    raw = torch.nonzero(counts).flatten()
    lut = torch.full((256,), IGNORE, dtype=torch.uint8, device=dev)
    lut[raw] = torch.arange(len(raw), dtype=torch.uint8, device=dev)
    g_n = len(raw)
    gt, present = {}, {}
    for size, g in feats.gt.items():
        c = lut[g.long()]
        gt[size] = c
        nf = c.shape[0]
        idx = torch.arange(nf, device=dev)[:, None] * g_n + c.reshape(nf, -1).long()
        idx = torch.where(c.reshape(nf, -1) != IGNORE, idx, torch.full_like(idx, nf * g_n))
        present[size] = (torch.bincount(idx.reshape(-1), minlength=nf * g_n + 1)[:-1] > 0).view(nf, g_n)
    return Labels(raw.cpu().numpy(), gt, present)


def memory_budget(cfg, device: torch.device) -> int:
    """Elements allowed in the largest clustering temporary (``cfg.memory_budget``; 0 = auto)."""
    if cfg.memory_budget:
        return int(cfg.memory_budget)
    return 1 << 28 if device.type == "cuda" else 1 << 26


def pool_points(pools: Pools, hw: tuple[int, int]) -> torch.Tensor:
    """Points k-means can draw from in each pool: its frames x ``hw`` pixels (or patch tokens)."""
    return pools.count * (hw[0] * hw[1])


def check_pools(pools: Pools, hw: tuple[int, int], cluster_at: str, name) -> None:
    """Raise :class:`UserError` when a pool has more clusters than points (``name(p)`` names pool p)."""
    n = pool_points(pools, hw)
    over = torch.nonzero(pools.k > n).flatten()
    if over.numel():
        p = int(over[0])
        unit = "patch tokens (cluster_at=patch)" if cluster_at == "patch" else "pixels"
        raise UserError(f"{name(p)}: K={int(pools.k[p])} clusters but only {int(n[p])} points to cluster "
                        f"({int(pools.count[p])} frames x {hw[0]}x{hw[1]} {unit}); K must be at most the "
                        "number of points")


def _cluster(grid, pools, size, labels_gt, n_labels, frame_block, n_blocks, cfg, seed, keep=None,
             name=lambda p: f"pool {p}"):
    """Fit every pool's k-means and return (conf [n_blocks, G, K], kept predictions)."""
    budget = memory_budget(cfg, grid.device)
    gen = torch.Generator(device=grid.device)
    gen.manual_seed(int(seed))
    if cfg.cluster_at == "patch":
        hw = tuple(grid.shape[-2:])
    else:
        hw = size
    check_pools(pools, hw, cfg.cluster_at, name)
    k_max = int(pools.k.max())
    n_pool = len(pools.k)
    cents = torch.zeros(n_pool, k_max, grid.shape[1], device=grid.device)
    # Chunks of pools so that the sampled points stay within the memory budget.
    per_pool = max(1, k_max * cfg.max_points_per_centroid * grid.shape[1] * 4)
    step = max(1, budget // per_pool)
    flat = grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1])
    for j, a in enumerate(range(0, n_pool, step)):
        b = min(n_pool, a + step)
        sub = Pools(pools.start[a:b], pools.count[a:b], pools.k[a:b], pools.frame_pool)
        x, valid = sample_points(grid, sub, hw, cfg.max_points_per_centroid, gen, flat)
        c, _ = kmeans_fit(x, sub.k, valid=valid, niter=cfg.niter, restarts=cfg.restarts,
                          seed=seed * 7919 + j, budget=budget)
        cents[a:b, : c.shape[1]] = c
    return assign_confusion(grid, cents, pools, labels_gt, n_labels, frame_block, n_blocks, budget, keep)


def _match_all(conf: np.ndarray, mode: str, bg: int | None) -> list:
    return [match_confusion(c, mode, background=bg) for c in conf]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_protocol(feats: FeatureSet, cfg, seq_names: list[str], seed: int, keep_seqs: list[int] = ()) -> dict:
    """One repeat of F, C, D and overclustering with ``seed`` -> a results dict (percent mIoU).

    ``keep_seqs``: sequences whose C predictions (mapped to raw label ids) are returned for
    overlays under ``"overlays"``. fp32 matmuls run at full precision (no TF32) throughout,
    whatever the process set before.
    """
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return _run_protocol(feats, cfg, seq_names, seed, keep_seqs)
    finally:
        torch.set_float32_matmul_precision(prev)


def _run_protocol(feats: FeatureSet, cfg, seq_names: list[str], seed: int, keep_seqs) -> dict:
    dev = feats.grid.device
    labels = compact_labels(feats)
    g_n = len(labels.raw)
    bg = int(np.flatnonzero(labels.raw == 0)[0]) if (labels.raw == 0).any() else None
    size_fc = tuple(cfg.eval_size)
    size_d = tuple(cfg.eval_size_dataset)
    nf = feats.n_frames
    n_seq = len(seq_names)
    frame_seq = feats.frame_seq
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    groups = {"clip": frame_seq, "batch": frame_seq // cfg.batch_videos, "dataset": None}[cfg.pca_scope]
    grid_fc = reduce_grid(feats.grid, groups, cfg.pca_dim, cfg.standardize)
    grid_d = grid_fc if cfg.pca_scope == "dataset" else reduce_grid(feats.grid, None, cfg.pca_dim, cfg.standardize)
    _sync(dev)
    seconds["pca"] = time.perf_counter() - t0

    # F: one pool per frame.
    t0 = time.perf_counter()
    frames = torch.arange(nf, device=dev)
    pres = labels.present[size_fc]
    pools_f = Pools.from_groups(frames, pres.sum(1).clamp_min(1))
    fs_np = frame_seq.cpu().numpy()
    conf_f, _ = _cluster(grid_fc, pools_f, size_fc, labels.gt[size_fc], g_n, frames, nf, cfg, seed * 4 + 0,
                         name=lambda p: f"F: frame {p} ('{seq_names[fs_np[p]]}')")
    res_f = _match_all(conf_f.cpu().numpy(), "hungarian", bg)
    seconds["F"] = time.perf_counter() - t0

    # C: one pool per clip.
    t0 = time.perf_counter()
    pres_seq = torch.zeros(n_seq, g_n, dtype=torch.long, device=dev).index_add_(0, frame_seq, pres.long()) > 0
    pools_c = Pools.from_groups(frame_seq, pres_seq.sum(1).clamp_min(1))
    keep = {int(i) for s in keep_seqs for i in torch.nonzero(frame_seq == s).flatten().tolist()}
    conf_c, kept = _cluster(grid_fc, pools_c, size_fc, labels.gt[size_fc], g_n, frame_seq, n_seq, cfg,
                            seed * 4 + 1, keep, name=lambda p: f"C: clip '{seq_names[p]}'")
    res_c = _match_all(conf_c.cpu().numpy(), "hungarian", bg)
    seconds["C"] = time.perf_counter() - t0

    # D: one pool, confusion kept per clip for the per-sequence table.
    t0 = time.perf_counter()
    pres_d = labels.present[size_d]
    one = torch.zeros(nf, dtype=torch.long, device=dev)
    k_d = pres_d.any(0).sum().clamp_min(1).reshape(1)
    pools_d = Pools.from_groups(one, k_d)
    conf_d, _ = _cluster(grid_d, pools_d, size_d, labels.gt[size_d], g_n, frame_seq, n_seq, cfg, seed * 4 + 2,
                         name=lambda p: "D: the dataset-wise pool")
    conf_d_np = conf_d.cpu().numpy()
    res_d = match_confusion(conf_d_np.sum(0), "hungarian", background=bg)
    seconds["D"] = time.perf_counter() - t0

    # Overclustering: dataset-wise, fixed K, majority.
    over = {}
    for j, k in enumerate(cfg.overcluster_k):
        t0 = time.perf_counter()
        pools_o = Pools.from_groups(one, torch.tensor([k], device=dev))
        conf_o, _ = _cluster(grid_d, pools_o, size_d, labels.gt[size_d], g_n, one, 1, cfg, seed * 4 + 3 + 1000 * j,
                             name=lambda p, k=k: f"overclustering (--k / overcluster_k) {k}")
        r = match_confusion(conf_o.cpu().numpy()[0], "majority", background=bg)
        over[str(k)] = {"miou": 100 * r.miou, "accuracy": 100 * r.accuracy,
                        "seconds": time.perf_counter() - t0}
        seconds[f"overcluster_{k}"] = over[str(k)]["seconds"]

    # Scores (percent). F: mean over frames with labels; C: mean over clips.
    f_frame = np.array([r.miou for r in res_f])
    f_seq = [float(np.nanmean(f_frame[(frame_seq == s).cpu().numpy()])) for s in range(n_seq)]
    c_seq = [r.miou for r in res_c]
    d_seq = []
    for s in range(n_seq):
        r = _apply_mapping(conf_d_np[s], res_d.mapping)
        d_seq.append(r)
    per_seq = [
        {"sequence": seq_names[s], "frames": int((frame_seq == s).sum()),
         "labels": [int(labels.raw[i]) for i in np.flatnonzero(pres_seq[s].cpu().numpy())],
         "F": 100 * f_seq[s], "C": 100 * c_seq[s], "D": 100 * d_seq[s]}
        for s in range(n_seq)
    ]
    overlays = {}
    for s in keep_seqs:
        mapping = res_c[s].mapping
        lut = np.where(mapping >= 0, labels.raw[np.maximum(mapping, 0)], 0).astype(np.uint8)
        idx = torch.nonzero(frame_seq == s).flatten().tolist()
        overlays[int(s)] = {
            "pred": np.stack([lut[kept[i].long().numpy()] for i in idx]),
            "gt": np.stack([_raw(labels, labels.gt[size_fc][i]) for i in idx]),
        }
    if cfg.score_average == "batch":  # the reference: per loader batch of batch_videos videos, then over batches
        score_f = _batch_mean(f_frame, fs_np // cfg.batch_videos)
        score_c = _batch_mean(np.asarray(c_seq, dtype=np.float64), np.arange(n_seq) // cfg.batch_videos)
    else:
        score_f, score_c = float(np.nanmean(f_frame)), float(np.nanmean(c_seq))
    return {
        "F": 100 * score_f,
        "C": 100 * score_c,
        "D": 100 * res_d.miou,
        "D_iou_per_label": {int(labels.raw[g]): 100 * float(v) for g, v in zip(res_d.labels, res_d.iou)},
        "K": {"F_mean": float(pools_f.k.float().mean()), "C_mean": float(pools_c.k.float().mean()),
              "D": int(k_d[0])},
        "overclustering": over,
        "per_sequence": per_seq,
        "seconds": seconds,
        "overlays": overlays,
    }


def _batch_mean(values: np.ndarray, batch: np.ndarray) -> float:
    """Mean over batches of each batch's nan-mean of ``values`` (batches without a finite value left out)."""
    means = [float(np.nanmean(v)) for b in np.unique(batch) if np.isfinite(v := values[batch == b]).any()]
    return float(np.mean(means)) if means else math.nan


def _apply_mapping(conf: np.ndarray, mapping: np.ndarray) -> float:
    """mIoU of one block's confusion under a mapping fixed elsewhere (labels present in the block)."""
    conf = conf.astype(np.float64)
    gt_count = conf.sum(1)
    present = gt_count > 0
    if not present.any():
        return math.nan
    onehot = np.zeros((conf.shape[1], conf.shape[0]))
    ok = mapping >= 0
    onehot[np.flatnonzero(ok), mapping[ok]] = 1
    tp = np.einsum("gk,kg->g", conf, onehot)
    union = gt_count + conf.sum(0) @ onehot - tp
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
    return float(iou[present].mean())


def _raw(labels: Labels, compact: torch.Tensor) -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.uint8)
    lut[: len(labels.raw)] = labels.raw
    return lut[compact.cpu().numpy()]
