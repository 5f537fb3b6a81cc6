"""DAVIS-2017 semi-supervised metrics: region similarity J, boundary accuracy F, J&F.

Definitions as the official evaluator (davisvideochallenge/davis2017-evaluation, ``davis2017/``;
``../shared/reference/evals.md`` §1.2), rewritten batched in torch (frames x objects at once, on
the device of the masks):

- **J** (``metrics.db_eval_iou``): ``|P ∩ G| / |P ∪ G|`` per object and frame; an empty union is 1.
- **F** (``metrics.db_eval_boundary``): boundaries by ``_seg2bmap`` (a pixel differs from its east,
  south or south-east neighbour, zero padding; the last row compares with the east neighbour only,
  the last column with the south one only, the bottom-right corner is 0); tolerance
  ``r = ceil(0.008 * sqrt(H^2 + W^2))`` px (8 at 480x854); each boundary dilated by a disk of radius
  ``r`` (skimage ``disk(r)``: offsets with ``dy^2 + dx^2 <= r^2``); ``P = |B_pred ∧ D(B_gt)| / |B_pred|``,
  ``R = |B_gt ∧ D(B_pred)| / |B_gt|``, ``F = 2PR / (P + R)`` (0 when ``P + R = 0``). No predicted
  boundary: P = 1, R = 0; no GT boundary: P = 0, R = 1; neither: P = R = 1 (F = 1).
- Objects (``davis.py``, ``evaluation.py``): GT objects are ``1..max id of the first GT frame``; void
  (255) is background; predicted objects ``1..max predicted id over the sequence`` (more than the GT
  has is an error, fewer are empty masks); the **first and last frames are excluded**.
- Per object (``utils.db_statistics``): Mean = nanmean, Recall = nanmean(v > 0.5), Decay =
  mean(first quarter) - mean(last quarter) with bins ``ids = round(linspace(1, N, 5) + 1e-10) - 1``,
  ``bin i = v[ids[i] : ids[i+1] + 1]``.
- Aggregate (``evaluation_method.py``): J-Mean, F-Mean (and Recall, Decay) are means over **all objects
  of all sequences**; ``J&F-Mean = (J-Mean + F-Mean) / 2``.

Departures: the disk dilation is a union of ``2r + 1`` shifted row max-pools (exactly ``cv2.dilate`` with
``disk(r)``, no cv2 / skimage needed, batched on the device); the decay bins use int64 indices (the
reference casts them to uint8, which wraps for sequences of more than 257 frames); values are fractions
here and percent in the instruments' outputs.

Shapes: masks ``[..., H, W]`` bool; ``[O, T, H, W]`` per sequence (objects x frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from wtours.errors import UserError

BOUND_TH = 0.008
VOID = 255


def j_region(gt: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Region similarity of bool masks ``[..., H, W]`` -> ``[...]`` fp64 (empty union: 1)."""
    gt, pred = gt.bool(), pred.bool()
    inter = (gt & pred).sum((-2, -1)).double()
    union = (gt | pred).sum((-2, -1)).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def seg2bmap(seg: torch.Tensor) -> torch.Tensor:
    """Boundary map of bool masks ``[..., H, W]`` as the reference's ``_seg2bmap`` at full size."""
    seg = seg.bool()
    e = torch.zeros_like(seg)
    s = torch.zeros_like(seg)
    se = torch.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def bound_pixels(height: int, width: int, bound_th: float = BOUND_TH) -> int:
    """The tolerance radius in pixels: ``bound_th`` itself when >= 1, else ``ceil(bound_th * diagonal)``."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.sqrt(height ** 2 + width ** 2)))


def dilate_disk(b: torch.Tensor, r: int) -> torch.Tensor:
    """Binary dilation of ``[..., H, W]`` by a disk of radius ``r`` (offsets with dy²+dx² <= r²).

    The disk is the union of its rows: for each row offset ``dy`` a horizontal run of half-width
    ``floor(sqrt(r² - dy²))``. Each run is a max-pool along x; the rows are OR-ed after a shift in y."""
    if r <= 0:
        return b.bool().clone()
    shape = b.shape
    h, w = shape[-2:]
    x = b.reshape(-1, 1, h, w).float()
    out = torch.zeros((x.shape[0], h, w), dtype=torch.bool, device=b.device)
    rows: dict[int, torch.Tensor] = {}
    for dy in range(-min(r, h - 1), min(r, h - 1) + 1):
        half = math.isqrt(r * r - dy * dy)
        if half not in rows:
            rows[half] = F.max_pool2d(x, (1, 2 * half + 1), stride=1, padding=(0, half))[:, 0] > 0 \
                if half else x[:, 0] > 0
        run = rows[half]
        # out[y] |= run[y + dy]  (the disk around a boundary pixel at y + dy reaches y)
        if dy >= 0:
            out[:, : h - dy] |= run[:, dy:]
        else:
            out[:, -dy:] |= run[:, : h + dy]
    return out.reshape(shape)


def f_boundary(gt: torch.Tensor, pred: torch.Tensor, bound_th: float = BOUND_TH) -> torch.Tensor:
    """Boundary F-measure of bool masks ``[..., H, W]`` -> ``[...]`` fp64."""
    h, w = gt.shape[-2:]
    r = bound_pixels(h, w, bound_th)
    bg, bp = seg2bmap(gt), seg2bmap(pred)
    dg, dp = dilate_disk(bg, r), dilate_disk(bp, r)
    n_p = bp.sum((-2, -1)).double()
    n_g = bg.sum((-2, -1)).double()
    p_match = (bp & dg).sum((-2, -1)).double()
    g_match = (bg & dp).sum((-2, -1)).double()
    precision = torch.where(n_p > 0, p_match / n_p.clamp_min(1), torch.ones_like(n_p))
    recall = torch.where(n_g > 0, g_match / n_g.clamp_min(1), torch.ones_like(n_g))
    # the reference's special cases: no predicted boundary -> P=1, R=0; no GT boundary -> P=0, R=1; neither: 1, 1
    recall = torch.where((n_p == 0) & (n_g > 0), torch.zeros_like(recall), recall)
    precision = torch.where((n_p > 0) & (n_g == 0), torch.zeros_like(precision), precision)
    s = precision + recall
    return torch.where(s > 0, 2 * precision * recall / s.clamp_min(1e-300), torch.zeros_like(s))


def db_statistics(values: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame values, as ``utils.db_statistics``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    with np.errstate(invalid="ignore"):
        mean = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
        recall = float(np.nanmean(v > 0.5))
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
    bins = [v[ids[i]: ids[i + 1] + 1] for i in range(4)]
    with np.errstate(invalid="ignore"):
        first = float(np.nanmean(bins[0])) if bins[0].size and np.isfinite(bins[0]).any() else math.nan
        last = float(np.nanmean(bins[3])) if bins[3].size and np.isfinite(bins[3]).any() else math.nan
    return mean, recall, first - last


def object_masks(labels: torch.Tensor, n_objects: int) -> torch.Tensor:
    """``[T, H, W]`` integer label maps -> ``[n_objects, T, H, W]`` bool (object i+1 in row i)."""
    ids = torch.arange(1, n_objects + 1, device=labels.device).view(-1, 1, 1, 1)
    return labels.long()[None] == ids


@dataclass
class SequenceScores:
    """Per object (``objects`` = ids 1..O) and per evaluated frame (first and last excluded)."""

    name: str
    objects: list[int]
    j: np.ndarray  # [O, T-2]
    f: np.ndarray  # [O, T-2]

    def stats(self) -> list[dict]:
        rows = []
        for i, o in enumerate(self.objects):
            jm, jr, jd = db_statistics(self.j[i])
            fm, fr, fd = db_statistics(self.f[i])
            rows.append({"sequence": self.name, "object": o, "J-Mean": jm, "J-Recall": jr, "J-Decay": jd,
                         "F-Mean": fm, "F-Recall": fr, "F-Decay": fd})
        return rows


def evaluate_sequence(name: str, gt: torch.Tensor, pred: torch.Tensor, bound_th: float = BOUND_TH,
                      frame_chunk: int = 16) -> SequenceScores:
    """J and F of one sequence: ``gt`` / ``pred`` ``[T, H, W]`` integer label maps at the GT size (void
    255 in ``gt`` is background). Objects and frames as the reference (see the module doc)."""
    if gt.shape != pred.shape:
        raise ValueError(f"{name}: prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    gt = gt.long().masked_fill(gt.long() == VOID, 0)
    pred = pred.long()
    n_gt = int(gt[0].max())
    n_pred = int(pred.max()) if pred.numel() else 0
    if n_pred > n_gt:
        raise UserError(f"sequence '{name}': the prediction has object id {n_pred} but the first ground-truth frame "
                        f"has only {n_gt} object(s) (the official evaluator stops here)")
    t = gt.shape[0]
    frames = list(range(1, t - 1))
    j = np.zeros((n_gt, len(frames)))
    f = np.zeros((n_gt, len(frames)))
    for a in range(0, len(frames), frame_chunk):
        sel = frames[a: a + frame_chunk]
        g = object_masks(gt[sel], n_gt)
        p = object_masks(pred[sel], n_gt)
        j[:, a: a + len(sel)] = j_region(g, p).cpu().numpy()
        f[:, a: a + len(sel)] = f_boundary(g, p, bound_th).cpu().numpy()
    return SequenceScores(name, list(range(1, n_gt + 1)), j, f)


def summarize(scores: list[SequenceScores]) -> dict:
    """Global results (fractions): J / F Mean, Recall, Decay over all objects of all sequences, J&F-Mean;
    per-object rows and per-sequence means."""
    rows = [r for s in scores for r in s.stats()]
    out: dict = {}
    for m in ("J", "F"):
        for st in ("Mean", "Recall", "Decay"):
            vals = np.array([r[f"{m}-{st}"] for r in rows], dtype=np.float64)
            out[f"{m}-{st}"] = float(np.mean(vals)) if vals.size else math.nan
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    per_seq = []
    for s in scores:
        own = [r for r in rows if r["sequence"] == s.name]
        jm = float(np.mean([r["J-Mean"] for r in own])) if own else math.nan
        fm = float(np.mean([r["F-Mean"] for r in own])) if own else math.nan
        per_seq.append({"sequence": s.name, "objects": len(own), "frames_scored": int(s.j.shape[1]),
                        "J-Mean": jm, "F-Mean": fm, "J&F-Mean": (jm + fm) / 2})
    out["per_object"] = rows
    out["per_sequence"] = per_seq
    return out
