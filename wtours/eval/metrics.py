"""Cluster-to-label matching and mIoU from confusion matrices (TimeT's ``PredsmIoU``, rewritten).

Everything starts from a confusion matrix ``conf[g, c]`` = pixels of ground-truth label ``g``
assigned to cluster ``c`` (ignored pixels excluded), built with one ``bincount`` instead of the
reference's per-(label, cluster) boolean passes (TimeT ``metrics.py`` + joblib; ~200x slower).

Matching modes (TimeT ``metrics.PredsmIoU.compute_miou``):

- ``"hungarian"``: one-to-one, :func:`scipy.optimize.linear_sum_assignment` on ``1 - IoU``
  between the labels and the clusters present in the pool; clusters left unmatched (more
  clusters than labels) are assigned to the background label (raw id 0), as the reference does.
- ``"majority"``: many-to-one, every cluster goes to the label holding most of its pixels
  (the reference's ``many_to_one=True, precision_based=True``, used for overclustering).

mIoU = mean over the ground-truth labels present in the pool (background included, as the
reference's ``involve_bg=True``) of ``TP / (TP + FP + FN)``.

Note: majority matching maximises *pixel accuracy* (it is never below Hungarian's), and it
gives 100 for any clustering that refines the ground truth, but for mIoU it is not a theorem
that it beats Hungarian (two clusters sharing one label can leave another label at IoU 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

MODES = ("hungarian", "majority")


@dataclass
class MatchResult:
    """Outcome of matching one pool.

    ``labels``: [G'] indices (rows of ``conf``) of the labels present; ``iou``: [G'] their IoU;
    ``mapping``: [K] row index each cluster is mapped to (-1: cluster mapped to no present label);
    ``clusters``: [K] the cluster ids ``mapping`` is aligned with (``None``: 0..K-1);
    ``miou`` and ``accuracy`` (pixel accuracy) in [0, 1].
    """

    miou: float
    accuracy: float
    labels: np.ndarray
    iou: np.ndarray
    mapping: np.ndarray
    clusters: np.ndarray | None = None


def confusion(pred: torch.Tensor, gt: torch.Tensor, n_gt: int, n_pred: int, ignore_index: int | None = 255) -> torch.Tensor:
    """``conf[g, c]`` (int64, [n_gt, n_pred]) of integer maps of equal shape, by one bincount."""
    pred = pred.reshape(-1).long()
    gt = gt.reshape(-1).long()
    keep = torch.ones_like(gt, dtype=torch.bool) if ignore_index is None else gt != ignore_index
    idx = gt * n_pred + pred
    idx = torch.where(keep, idx, torch.full_like(idx, n_gt * n_pred))  # ignored -> overflow bin
    return torch.bincount(idx, minlength=n_gt * n_pred + 1)[: n_gt * n_pred].view(n_gt, n_pred)


def match_confusion(conf: np.ndarray, mode: str = "hungarian", background: int | None = 0) -> MatchResult:
    """Map clusters (columns) to labels (rows) and score the pool.

    ``conf``: [G, K] pixel counts. ``background``: row of the background label, which receives
    the clusters Hungarian leaves unmatched (``None``: they are mapped to nothing).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    conf = np.asarray(conf, dtype=np.float64)
    gt_count = conf.sum(1)
    pred_count = conf.sum(0)
    present = np.flatnonzero(gt_count > 0)
    n_k = conf.shape[1]
    mapping = np.full(n_k, -1, dtype=np.int64)
    if present.size == 0:
        return MatchResult(float("nan"), float("nan"), present, np.zeros(0), mapping)
    used = np.flatnonzero(pred_count > 0)
    if mode == "majority":
        mapping[used] = np.argmax(conf[:, used], axis=0)
    else:
        sub = conf[np.ix_(present, used)]
        union = gt_count[present, None] + pred_count[None, used] - sub
        iou = np.divide(sub, union, out=np.zeros_like(sub), where=union > 0)
        rows, cols = linear_sum_assignment(1.0 - iou)
        mapping[used[cols]] = present[rows]
        if background is not None and 0 <= background < conf.shape[0]:
            unmatched = np.setdiff1d(used, used[cols])
            mapping[unmatched] = background
    # Pixels of cluster c are predicted as label mapping[c]; per-label TP / predicted counts.
    g_n = conf.shape[0]
    onehot = np.zeros((n_k, g_n))
    ok = mapping >= 0
    onehot[np.flatnonzero(ok), mapping[ok]] = 1.0
    tp = np.einsum("gk,kg->g", conf, onehot)
    pred_as = pred_count @ onehot
    union = gt_count + pred_as - tp
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)[present]
    total = gt_count.sum()
    return MatchResult(float(iou.mean()), float(tp.sum() / total), present, iou, mapping)


def cluster_miou(
    pred: torch.Tensor | np.ndarray,
    gt: torch.Tensor | np.ndarray,
    mode: str = "hungarian",
    ignore_index: int | None = 255,
    return_details: bool = False,
) -> float | MatchResult:
    """mIoU in [0, 1] of a cluster map ``pred`` against ground truth ``gt`` (any equal shapes).

    Cluster ids and label ids may be any non-negative integers (not contiguous); ``gt ==
    ignore_index`` pixels are left out. The background label is raw id 0. Relabelling the
    clusters never changes the score. ``return_details=True`` returns a :class:`MatchResult`
    whose ``labels`` / ``mapping`` hold raw label ids, aligned with the raw cluster ids in
    ``clusters``.
    """
    pred_t = torch.as_tensor(np.asarray(pred) if not isinstance(pred, torch.Tensor) else pred)
    gt_t = torch.as_tensor(np.asarray(gt) if not isinstance(gt, torch.Tensor) else gt)
    if pred_t.shape != gt_t.shape:
        raise ValueError(f"pred {tuple(pred_t.shape)} and gt {tuple(gt_t.shape)} differ in shape")
    pred_t, gt_t = pred_t.reshape(-1).long(), gt_t.reshape(-1).long()
    if ignore_index is not None:
        keep = gt_t != ignore_index
        pred_t, gt_t = pred_t[keep], gt_t[keep]
    if (pred_t < 0).any() or (gt_t < 0).any():
        raise ValueError("cluster and label ids must be non-negative")
    if gt_t.numel() == 0:
        empty = np.zeros(0, dtype=np.int64)
        res = MatchResult(float("nan"), float("nan"), empty, np.zeros(0), empty, empty)
        return res if return_details else res.miou
    gt_ids, gt_c = torch.unique(gt_t, return_inverse=True)
    pred_ids, pred_c = torch.unique(pred_t, return_inverse=True)
    conf = confusion(pred_c, gt_c, len(gt_ids), len(pred_ids), ignore_index=None).cpu().numpy()
    gt_ids_np = gt_ids.cpu().numpy()
    bg = np.flatnonzero(gt_ids_np == 0)
    res = match_confusion(conf, mode, background=int(bg[0]) if bg.size else None)
    if not return_details:
        return res.miou
    mapping = np.where(res.mapping >= 0, gt_ids_np[np.maximum(res.mapping, 0)], -1)
    return MatchResult(res.miou, res.accuracy, gt_ids_np[res.labels], res.iou, mapping, pred_ids.cpu().numpy())
