"""Semi-supervised video object segmentation by label propagation, scored by DAVIS-2017 J&F.

``wtours eval propagation`` / :func:`evaluate_propagation`. Protocol: DINO's
``eval_video_segmentation.py`` (Caron et al., ICCV 2021, §4.2.2, after Jabri et al.'s space-time
correspondence); ``../shared/reference/evals.md`` §1.1; scores: :mod:`wtours.eval.davis_metrics` (§1.2).

Per sequence (every annotated frame, in order):

1. Frames resized (bilinear) so that the short side is ``short_side`` (480) and the long side
   ``floor(short_side * long / short / long_multiple) * long_multiple`` (854x480 -> 832x480); normalised
   with DINO's mean / std (0.485, 0.456, 0.406) / (**0.228**, 0.224, 0.225); a size that is not a multiple
   of the patch is cropped at the bottom / right to one (what DINO's strided patch conv does at patch 14).
2. Features: last block's patch tokens after the final norm (:func:`wtours.eval.features.extract_features`),
   ``[T, D, h, w]``, L2-normalised per patch.
3. The first GT mask, nearest-resized to ``(h, w)``, one-hot with ``C = max id + 1`` channels (void 255 ->
   background).
4. Frame ``t >= 1``: context = frame 0 (its one-hot labels) + the last ``min(t - 1, n_last_frames)`` frames
   (their **soft** predictions, a FIFO). Per target patch ``i`` and context patch ``j``:
   ``a_ij = exp(<f_i, f_j> / temperature) * [|dy| <= r and |dx| <= r]`` (``r = size_mask_neighborhood``);
   the ``topk`` largest ``a_ij`` over **all context frames jointly** are kept (values >= the k-th, ties kept),
   the rest zeroed, normalised to sum 1; ``y_i = sum_j w_ij y_j`` ``[C]``.
5. Output: ``y`` ``[C, h, w]`` bilinearly upsampled by the patch size (align_corners=False), each channel
   with max > 0 min-max rescaled (DINO's ``norm_mask``), argmax, nearest-resized to the frame's size.
   Frame 0 is the GT. J&F on frames 1..T-2 (the evaluator drops the first and last).

Batched on the device: all target patches of a frame at once (in chunks of rows that keep the affinity
``[rows, n_context * h * w]`` under ``memory_budget`` elements), fp32 with full-precision matmuls; the
only loop is over frames, which propagation needs.

Departures from the reference code, and why:

- resize with PIL bilinear (antialiased when shrinking) instead of ``cv2.resize`` (no cv2 dependency);
- ``norm_mask`` of a channel that is constant and positive: DINO divides by 0, and the NaN wins the argmax
  (torch's max propagates NaN); here such a channel is set to +inf, which wins the argmax the same way
  (first such channel) without NaN;
- void (255) in the first mask is background (DINO's one-hot would make 256 channels; DAVIS-2017 480p first
  frames have no void).

Outputs (``--out``, default ``runs/eval/propagation/<dataset>``): ``metrics.json`` (J&F-Mean, J-Mean,
F-Mean, recalls, decays in %, per sequence, settings, encoder identity, timing), ``per_sequence.csv``,
``per_object.csv`` (the official evaluator's per-sequence file: one row per object), ``overlays/<seq>.png``
(frame | ground truth | propagated masks) and, with ``save_masks``, ``masks/<seq>/<frame>.png`` (indexed
PNGs in the layout the official evaluator reads).
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wtours.errors import UserError
from wtours.eval.davis_metrics import BOUND_TH, SequenceScores, evaluate_sequence, summarize

DINO_MEAN = (0.485, 0.456, 0.406)
DINO_STD = (0.228, 0.224, 0.225)  # DINO's eval_video_segmentation.py L244 (0.228, sic)
# DINO paper Table 5, DAVIS-2017 val, (J&F)m / Jm / Fm
REFERENCE = {"DINO ViT-S/16": (61.8, 60.2, 63.4), "DINO ViT-B/16": (62.3, 60.7, 63.9),
             "DINO ViT-S/8": (69.9, 66.6, 73.1), "DINO ViT-B/8": (71.4, 67.9, 74.9),
             "supervised ViT-S/8": (66.0, 63.9, 68.1), "STC RN18": (67.6, 64.8, 70.2)}


@dataclass
class PropagationConfig:
    """Settings of ``wtours eval propagation`` (``configs/eval/propagation*.yaml``, ``--set key=value``).
    Defaults: DINO's (``n_last_frames`` 7, ``size_mask_neighborhood`` 12, ``topk`` 5, temperature 0.1, 480p)."""

    short_side: int = 480  # frames resized so that the short side is this
    long_multiple: int = 64  # ... and the long side floored to a multiple of this (DINO: 64)
    n_last_frames: int = 7  # queue of preceding frames' soft predictions
    size_mask_neighborhood: int = 12  # spatial window radius in patches (0: no window)
    topk: int = 5  # affinities kept per target patch, over all context frames jointly
    temperature: float = 0.1
    mean: list[float] = field(default_factory=lambda: list(DINO_MEAN))
    std: list[float] = field(default_factory=lambda: list(DINO_STD))
    bound_th: float = BOUND_TH  # F tolerance: fraction of the diagonal (>= 1: pixels)
    davis_annotations: str = "Annotations"  # <root>/<this>/480p
    max_instance_id: int = 50
    batch_size: int = 32  # frames per forward pass
    workers: int = 0  # decoding threads (0: one per core, at most 32)
    memory_budget: int = 0  # elements of the largest affinity chunk (0: 2^28 on CUDA, 2^25 on CPU)
    overlays: int = 3  # sequences drawn as PNG overlays
    save_masks: bool = False  # also write the propagated masks as indexed PNGs (masks/<seq>/<frame>.png)
    progress: bool = True

    def validate(self) -> None:
        for name in ("short_side", "long_multiple", "n_last_frames", "topk", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("size_mask_neighborhood", "workers", "memory_budget", "overlays"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean / std must be 3 values (std > 0), got {self.mean} / {self.std}")
        if not self.bound_th > 0:
            raise ValueError(f"bound_th must be > 0, got {self.bound_th}")
        if not 0 < self.max_instance_id < 255:
            raise ValueError("max_instance_id must be in 1..254")


def input_size(height: int, width: int, short_side: int = 480, multiple: int = 64) -> tuple[int, int]:
    """DINO's ``read_frame`` size: short side -> ``short_side``, long side floored to a multiple of
    ``multiple`` after scaling (854x480 -> (480, 832))."""
    if height > width:
        tw = short_side
        th = int((short_side * height / width) // multiple * multiple)
    else:
        th = short_side
        tw = int((short_side * width / height) // multiple * multiple)
    if th < 1 or tw < 1:
        raise UserError(f"frame {width}x{height}: short_side {short_side} / long_multiple {multiple} give an empty "
                        f"input ({tw}x{th}); lower long_multiple")
    return th, tw


def neighbourhood(h: int, w: int, radius: int, device: torch.device) -> torch.Tensor:
    """``[h*w (target), h*w (source)]`` bool: source within ``radius`` patches in y and in x (a square window,
    DINO's ``restrict_neighborhood``); ``radius`` 0: everything."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    if radius <= 0:
        return torch.ones(h * w, h * w, dtype=torch.bool, device=device)
    return ((ys[:, None] - ys[None, :]).abs() <= radius) & ((xs[:, None] - xs[None, :]).abs() <= radius)


def propagate(feats: torch.Tensor, first: torch.Tensor, n_last: int = 7, radius: int = 12, topk: int = 5,
              temperature: float = 0.1, budget: int = 1 << 25) -> torch.Tensor:
    """Label propagation through a sequence.

    ``feats`` ``[T, D, h, w]`` patch features (normalised here), ``first`` ``[C, h, w]`` labels of frame 0
    (one-hot) -> ``[T, C, h, w]`` fp32 soft labels (row 0 = ``first``). See the module doc, step 4."""
    t_n, d, h, w = feats.shape
    c = first.shape[0]
    n = h * w
    f = F.normalize(feats.float().reshape(t_n, d, n).transpose(1, 2), dim=-1)  # [T, N, D]
    win = neighbourhood(h, w, radius, feats.device)  # [N, N]
    out = torch.empty(t_n, n, c, dtype=torch.float32, device=feats.device)
    out[0] = first.float().reshape(c, n).T
    for t in range(1, t_n):
        ctx = [0] + list(range(max(1, t - n_last), t))
        keys = f[ctx].reshape(-1, d)  # [Nc*N, D]
        vals = out[ctx].reshape(-1, c)  # [Nc*N, C]
        nc = len(ctx)
        k = min(topk, nc * n)
        rows = max(1, budget // (nc * n))
        for a in range(0, n, rows):
            q = f[t, a: a + rows]  # [r, D]
            aff = torch.exp(q @ keys.T / temperature)  # [r, Nc*N]
            aff = aff * win[a: a + rows].repeat(1, nc)
            kth = aff.topk(k, dim=1).values[:, -1:]
            aff = torch.where(aff >= kth, aff, torch.zeros_like(aff))
            aff = aff / aff.sum(1, keepdim=True)
            out[t, a: a + rows] = aff @ vals
    return out.transpose(1, 2).reshape(t_n, c, h, w)


def norm_mask(x: torch.Tensor) -> torch.Tensor:
    """DINO's ``norm_mask`` on ``[..., C, H, W]``: channels with max > 0 shifted by their min and divided by
    their new max; a constant positive channel (0 / 0 in DINO, a NaN that wins the argmax) becomes +inf."""
    mx = x.amax((-2, -1), keepdim=True)
    mn = x.amin((-2, -1), keepdim=True)
    span = mx - mn
    scaled = torch.where(span > 0, (x - mn) / span.clamp_min(1e-30), torch.full_like(x, math.inf))
    return torch.where(mx > 0, scaled, x)


def to_labels(soft: torch.Tensor, patch: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """``[T, C, h, w]`` soft labels -> ``[T, H, W]`` uint8: bilinear x patch, ``norm_mask``, argmax, PIL nearest
    resize to ``out_hw`` (as DINO; on the CPU, per frame)."""
    t, c, h, w = soft.shape
    up = F.interpolate(soft.float(), size=(h * patch[0], w * patch[1]), mode="bilinear", align_corners=False)
    lab = norm_mask(up).argmax(1).to(torch.uint8)  # [T, h*p, w*p]
    if tuple(lab.shape[-2:]) != tuple(out_hw):
        from PIL import Image

        # PIL's NEAREST (16.16 fixed-point source coordinates): not torch's "nearest-exact" at every size
        res = [np.asarray(Image.fromarray(m).resize((out_hw[1], out_hw[0]), Image.NEAREST)) for m in lab.cpu().numpy()]
        lab = torch.from_numpy(np.stack(res)).to(soft.device)
    return lab


def one_hot_first(mask_small: torch.Tensor) -> torch.Tensor:
    """First GT mask at patch resolution ``[h, w]`` (void 255 -> 0) -> ``[C, h, w]`` one-hot, C = max id + 1."""
    m = mask_small.long().masked_fill(mask_small.long() == 255, 0)
    c = int(m.max()) + 1
    return F.one_hot(m, c).permute(2, 0, 1).float()


def propagate_sequence(name: str, grid: torch.Tensor, gt: torch.Tensor, gt_small_first: torch.Tensor,
                       patch: tuple[int, int], cfg: PropagationConfig, budget: int) -> tuple[SequenceScores, torch.Tensor]:
    """Propagation + J / F of one sequence from already-extracted features.

    ``grid`` ``[T, D, h, w]``; ``gt`` ``[T, H, W]`` label maps at the frames' size (255 void);
    ``gt_small_first`` ``[h, w]`` the first mask nearest-resized to the grid -> (scores, predictions
    ``[T, H, W]`` uint8 with frame 0 = GT)."""
    first = one_hot_first(gt_small_first.to(grid.device))
    soft = propagate(grid, first, cfg.n_last_frames, cfg.size_mask_neighborhood, cfg.topk, cfg.temperature, budget)
    pred = to_labels(soft, patch, tuple(gt.shape[-2:]))
    pred[0] = gt[0].masked_fill(gt[0] == 255, 0).to(torch.uint8)
    return evaluate_sequence(name, gt.to(pred.device), pred, cfg.bound_th), pred


# ----------------------------------------------------------------------------------------------- the command
def _pct(v: float) -> float:
    return 100.0 * v if v == v else v


def _write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    from wtours.fsutil import atomic_open

    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    wr.writeheader()
    for r in rows:
        wr.writerow({k: (f"{r[k]:.2f}" if isinstance(r[k], float) else r[k]) for k in cols})
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())


def _save_masks(folder: Path, frames: list[Path], pred: np.ndarray) -> None:
    from PIL import Image

    from wtours.fsutil import atomic_open, ensure_dir
    from wtours.video.synth import davis_palette

    ensure_dir(folder)
    for path, m in zip(frames, pred):
        im = Image.fromarray(m, "P")
        im.putpalette(davis_palette())
        with atomic_open(folder / f"{path.stem}.png", "wb") as f:
            im.save(f, format="PNG")


def summary_lines(m: dict) -> list[str]:
    lines = [f"encoder {m['encoder']['spec']} ({m['encoder']['arch']}), dataset {m['settings']['dataset']}: "
             f"{m['n_sequences']} sequences, {m['n_objects']} objects, {m['n_frames']} frames (%)",
             f"{'':38}{'J&F':>8}{'J':>8}{'F':>8}",
             f"{'this run':38}{m['J&F']:8.1f}{m['J']:8.1f}{m['F']:8.1f}"]
    tag = " (DAVIS-17 val, paper)"
    for k, v in REFERENCE.items():
        if k.startswith("DINO ViT-S"):
            lines.append(f"{k + tag:38}" + "".join(f"{x:8.1f}" for x in v))
    lines.append(f"total {m['timing']['total']:.1f} s on {m['settings']['device']}")
    return lines


def evaluate_propagation(
    dataset: str = "davis",
    root: str | Path = "",
    checkpoint: str = "",
    out: str | Path | None = None,
    cfg: PropagationConfig | None = None,
    arch: str | None = None,
    videos: str | Path | None = None,
    device: str = "auto",
    verbose: bool = True,
    trust: bool = False,
    feature_transform=None,
) -> dict:
    """Label propagation + J&F of ``checkpoint`` on a DAVIS-layout ``root`` (``dataset`` davis or synth) ->
    the metrics dict (also written to ``<out>/metrics.json``; see the module doc). ``feature_transform``:
    ``FeatureSet -> FeatureSet`` applied to each sequence's features (e.g.
    :func:`wtours.eval.features.gt_patch_features`, the oracle)."""
    from wtours.config import to_dict, to_yaml
    from wtours.eval.cli import resolve_device
    from wtours.eval.common import (Timer, budget as _budget, check_dataset_kind, device_settings,
                                    encoder_identity, load_encoder, validated)
    from wtours.eval.datasets import Dataset, read_dataset
    from wtours.eval.features import extract_features
    from wtours.eval.report import write_overlays
    from wtours.fsutil import ensure_dir, write_json, write_text

    cfg = validated(cfg or PropagationConfig())
    check_dataset_kind(dataset, ("davis", "synth"), "propagation",
                       "per-video instance masks in the DAVIS-2017 layout")
    t_start = time.perf_counter()
    dev = resolve_device(device)
    data = read_dataset(dataset, root, videos, 0, cfg.max_instance_id, annotations=cfg.davis_annotations)
    model, info = load_encoder(checkpoint, arch, trust, verbose)
    patch = tuple(model.patch_embed.patch_size)
    out_dir = ensure_dir(out or Path("runs") / "eval" / "propagation" / dataset)
    write_text(out_dir / "config.yaml", to_yaml(cfg))
    timer = Timer(dev)
    timer.lap("load")
    bud = _budget(cfg.memory_budget, dev)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    scores: list[SequenceScores] = []
    sizes: dict[str, list[int]] = {}
    pictures: list[str] = []
    n_frames = 0
    try:
        for s_i, seq in enumerate(data.sequences):
            from PIL import Image

            with Image.open(seq.frames[0]) as im:
                native = (im.height, im.width)
            in_hw = input_size(*native, cfg.short_side, cfg.long_multiple)
            grid_hw = (in_hw[0] // patch[0], in_hw[1] // patch[1])
            if min(grid_hw) < 1:
                raise UserError(f"input {in_hw[1]}x{in_hw[0]} is smaller than one patch ({patch[0]} px); raise short_side")
            sizes[seq.name] = [in_hw[0], in_hw[1]]
            one = Dataset(data.name, data.root, [seq], data.label_kind)
            feats = extract_features(model, one, dev, in_hw, [native, grid_hw], cfg.batch_size, cfg.workers,
                                     cfg.progress, tuple(cfg.mean), tuple(cfg.std), floor_to_patch=True,
                                     source=checkpoint)
            if feature_transform is not None:
                feats = feature_transform(feats)
            timer.lap("features")
            sc, pred = propagate_sequence(seq.name, feats.grid, feats.gt[native], feats.gt[grid_hw][0], patch, cfg, bud)
            scores.append(sc)
            n_frames += feats.n_frames
            timer.lap("propagation")
            if s_i < cfg.overlays or cfg.save_masks:
                pred_np = pred.cpu().numpy()
                if s_i < cfg.overlays:
                    pictures += [str(p.relative_to(out_dir)) for p in write_overlays(
                        ensure_dir(out_dir / "overlays"), seq.name, seq.frames, feats.gt[native].cpu().numpy(),
                        pred_np, gif=False)]
                if cfg.save_masks:
                    _save_masks(out_dir / "masks" / seq.name, seq.frames, pred_np)
                timer.lap("pictures")
            del feats, pred
    finally:
        torch.set_float32_matmul_precision(prev)
    agg = summarize(scores)
    timer.seconds["total"] = time.perf_counter() - t_start
    per_seq = [{**r, **{k: _pct(r[k]) for k in ("J-Mean", "F-Mean", "J&F-Mean")}} for r in agg["per_sequence"]]
    per_obj = [{**r, **{k: _pct(v) for k, v in r.items() if k not in ("sequence", "object")}}
               for r in agg["per_object"]]
    metrics = {
        "J&F": _pct(agg["J&F-Mean"]), "J": _pct(agg["J-Mean"]), "F": _pct(agg["F-Mean"]),
        "J-Recall": _pct(agg["J-Recall"]), "J-Decay": _pct(agg["J-Decay"]),
        "F-Recall": _pct(agg["F-Recall"]), "F-Decay": _pct(agg["F-Decay"]), "unit": "%",
        "n_sequences": len(scores), "n_objects": len(per_obj), "n_frames": n_frames,
        "per_sequence": per_seq, "per_object": per_obj,
        "settings": {
            "instrument": "propagation", "dataset": dataset, "root": str(data.root), "annotations": data.annotations,
            "videos": str(videos) if videos else None, "config": to_dict(cfg), "input_sizes": sizes,
            **device_settings(dev),
            "protocol": "DINO eval_video_segmentation.py label propagation; DAVIS-2017 semi-supervised J&F "
                        "(first and last frames excluded, object-weighted means)",
            "notes": ["resize: PIL bilinear (reference: cv2.resize)",
                      "norm_mask: a constant positive channel wins the argmax (+inf here, NaN in the reference)",
                      "void (255) in the first mask is background"],
        },
        "encoder": encoder_identity(checkpoint, info, model),
        "timing": timer.seconds, "pictures": pictures,
        "reference": {"source": "DINO paper Table 5 (DAVIS-2017 val, (J&F)m / Jm / Fm), evals.md §1.3",
                      "methods": {k: dict(zip(("J&F", "J", "F"), v)) for k, v in REFERENCE.items()}},
    }
    write_json(out_dir / "metrics.json", metrics)
    _write_csv(out_dir / "per_sequence.csv", per_seq, ["sequence", "objects", "frames_scored", "J&F-Mean", "J-Mean",
                                                       "F-Mean"])
    _write_csv(out_dir / "per_object.csv", [{**r, "Sequence": f"{r['sequence']}_{r['object']}"} for r in per_obj],
               ["Sequence", "J-Mean", "F-Mean"])
    if verbose:
        print("\n".join(summary_lines(metrics)))
        print(f"wrote {out_dir / 'metrics.json'}")
    return metrics
