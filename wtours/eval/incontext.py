"""In-context segmentation by dense nearest-neighbour retrieval (Hummingbird), scored by mIoU.

``wtours eval incontext`` / :func:`evaluate_incontext`. Protocol: Balažević et al., "Towards In-context
Scene Understanding", NeurIPS 2023, as implemented by vpariza/open-hummingbird-eval (``hbird/hbird_eval.py``,
used by NeCo); ``../shared/reference/evals.md`` §2. Splits: :mod:`wtours.eval.splits`.

1. Frames resized (squashed) to ``input_size`` (224²), normalised with open-hummingbird's mean / std
   (0.485, 0.456, 0.406) / (0.229, 0.224, **0.255**, its typo kept as the default); masks nearest-resized to
   ``input_size``.
2. Features: last block's patch tokens after the final norm, ``[N, D, h, w]``, L2-normalised.
3. Memory (training split): per patch the class histogram of its ``p x p`` pixels (ignored 255 pixels count as
   class 0, as the reference's ``255 -> 0``), ``[M, C]``; every patch (``memory_size`` 0), or ``K =
   memory_size // n_frames`` patches per frame chosen rare-classes-first (the reference: score = sum over the
   classes in the patch of the number of the frame's patches holding that class, times U(0, 1), the K
   smallest) or uniformly (``memory_sampling: uniform``).
4. Queries (held-out split): cosine similarity to every memory key, the ``k`` (30) best;
   ``w = softmax(sim / temperature)`` (0.02) over them; label ``y = sum w_i y_i`` ``[C]``; ``[C, h, w]``
   bilinearly upsampled to ``input_size``, argmax.
5. One confusion matrix over all query pixels at ``input_size``, ignore (255) left out; IoU per class,
   **mIoU over all C classes** (``miou_over: all``, open-hummingbird's ``PredsmIoU``: a class absent from
   both the ground truth and the predictions counts 0) or over the classes present (``miou_over: present``).

Search: exact, on the device, in chunks: for a chunk of query patches the similarities to a chunk of the
memory, a running top-k merged chunk by chunk (``[queries, memory chunk]`` under ``memory_budget``
elements), fp32 with full-precision matmuls. No faiss / ScaNN (their flat inner-product search is exact too;
ScaNN, the reference's default, is approximate).

Departures from the reference, and why:

- no memory augmentation (the reference's default is 1 augmentation epoch of colour jitter + random resized
  crop with scale 0.5-2): frames are passed once, as they are (a deterministic memory; video sets hold many
  near-duplicate frames already);
- no Hungarian matching of the predictions (v2 applies one; the predictions are memory labels, already in the
  label space, so it is the identity when the retrieval is better than chance);
- video sets: memory and queries are evenly spaced annotated frames of the train / held-out videos
  (``memory_frames_per_clip`` / ``query_frames_per_clip``, 0 = all) instead of image lists.

Outputs (``--out``, default ``runs/eval/incontext/<dataset>``): ``metrics.json`` (mIoU %, IoU per class,
pixel accuracy, split, memory size and bytes, settings, encoder identity, timing), ``per_class.csv``,
``overlays/<video>.png`` (query frame | ground truth | retrieved labels).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from wtours.errors import UserError

HB_MEAN = (0.485, 0.456, 0.406)
HB_STD = (0.229, 0.224, 0.255)  # open-hummingbird-eval transforms.py L29 (0.255, sic)
IGNORE = 255
# mIoU %, Pascal VOC full data (evals.md §2; NeCo's table via DIP, DIP's re-evaluation)
REFERENCE = {"DINO ViT-S/16 (VOC)": 48.7, "TimeT ViT-S/16 (VOC)": 62.3, "NeCo ViT-S/14 (VOC)": 81.0}


@dataclass
class InContextConfig:
    """Settings of ``wtours eval incontext`` (``configs/eval/incontext*.yaml``, ``--set key=value``).
    Defaults: open-hummingbird-eval's (224², k 30, temperature 0.02, the whole memory)."""

    input_size: list[int] = field(default_factory=lambda: [224, 224])  # [H, W], squashed
    k: int = 30  # nearest neighbours per query patch
    temperature: float = 0.02  # softmax temperature over the k cosine similarities
    memory_size: int = 0  # patches in the memory (0: every patch of every memory frame)
    memory_sampling: Literal["rare_first", "uniform"] = "rare_first"  # which patches when memory_size > 0
    memory_frames_per_clip: int = 4  # annotated frames per training video, evenly spaced (0: all)
    query_frames_per_clip: int = 4  # annotated frames per held-out video (0: all)
    split: Literal["auto", "alternate"] = "auto"  # see wtours.eval.splits
    split_seed: int = 0  # YTVOS held-out split when no val.txt is found
    miou_over: Literal["all", "present"] = "all"
    mean: list[float] = field(default_factory=lambda: list(HB_MEAN))
    std: list[float] = field(default_factory=lambda: list(HB_STD))
    seed: int = 123  # memory sampling
    batch_size: int = 64  # frames per forward pass
    workers: int = 0
    memory_budget: int = 0  # elements of the largest similarity chunk (0: 2^28 on CUDA, 2^25 on CPU)
    missing_annotations: Literal["error", "skip"] = "error"
    overlays: int = 3
    progress: bool = True

    def validate(self) -> None:
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be [H, W] with positive values, got {self.input_size}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("memory_size", "memory_frames_per_clip", "query_frames_per_clip", "workers", "memory_budget",
                     "overlays"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean / std must be 3 values (std > 0), got {self.mean} / {self.std}")


def patch_histograms(labels: torch.Tensor, n_classes: int, patch: tuple[int, int]) -> torch.Tensor:
    """``[N, H, W]`` labels (255 -> class 0) -> ``[N, C, H/p, W/p]`` fraction of each class in each patch."""
    lab = labels.long().masked_fill(labels.long() == IGNORE, 0)
    if int(lab.max()) >= n_classes:
        raise ValueError(f"label {int(lab.max())} >= {n_classes} classes")
    onehot = F.one_hot(lab, n_classes).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, kernel_size=patch, stride=patch)


def sample_memory(hist: torch.Tensor, per_frame: int, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Indices ``[N, K]`` (into the flattened ``h*w`` patches) of the patches kept per frame.

    ``hist`` ``[N, C, h, w]``. ``rare_first``: score of a patch = sum over its classes of the number of the
    frame's patches holding that class, times U(0, 1); the K smallest. ``uniform``: K at random."""
    n, c, h, w = hist.shape
    present = (hist > 0).reshape(n, c, h * w).float()  # [N, C, P]
    u = torch.rand(n, h * w, generator=gen, device=gen.device).to(hist.device)
    if mode == "uniform":
        score = u
    else:
        freq = present.sum(2)  # [N, C] patches holding each class
        score = torch.einsum("ncp,nc->np", present, freq)
        score = torch.where(present.sum(1) > 0, score, torch.full_like(score, 1e6)) * u
    return score.topk(per_frame, dim=1, largest=False).indices


def knn_vote(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, temperature: float,
             budget: int) -> torch.Tensor:
    """``queries`` ``[Q, D]``, ``keys`` ``[M, D]`` (both L2-normalised), ``values`` ``[M, C]`` -> ``[Q, C]``:
    softmax(top-k cosine / temperature)-weighted sum of the neighbours' values. Exact, chunked."""
    q_n, m = queries.shape[0], keys.shape[0]
    if k > m:
        raise UserError(f"k={k} nearest neighbours but the memory holds only {m} patches; lower k or enlarge the "
                        "memory (memory_size, memory_frames_per_clip)")
    out = torch.empty(q_n, values.shape[1], dtype=torch.float32, device=queries.device)
    cols = min(m, max(k, budget // 1024))  # memory chunk
    rows = max(1, budget // cols)  # query chunk: [rows, cols] similarities at a time
    for a in range(0, q_n, rows):
        q = queries[a: a + rows]
        best_v = best_i = None
        for b in range(0, m, cols):
            v, i = (q @ keys[b: b + cols].T).topk(min(k, min(cols, m - b)), dim=1)
            i = i + b
            if best_v is not None:  # merge with the best so far
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                v, j = v.topk(min(k, v.shape[1]), dim=1)
                i = i.gather(1, j)
            best_v, best_i = v, i
        w = torch.softmax(best_v / temperature, dim=1)  # [r, k]
        out[a: a + rows] = torch.einsum("rk,rkc->rc", w, values[best_i])
    return out


@dataclass
class Memory:
    keys: torch.Tensor  # [M, D] L2-normalised
    values: torch.Tensor  # [M, C] class histograms

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


def build_memory(grid: torch.Tensor, labels: torch.Tensor, n_classes: int, patch: tuple[int, int],
                 memory_size: int = 0, sampling: str = "rare_first", seed: int = 123) -> Memory:
    """Memory bank from already-extracted features ``grid`` ``[N, D, h, w]`` and their labels ``[N, H, W]`` at
    the input size (``H = h * p``)."""
    n, d, h, w = grid.shape
    if tuple(labels.shape[-2:]) != (h * patch[0], w * patch[1]):
        raise ValueError(f"labels {tuple(labels.shape[-2:])} are not the input size {(h * patch[0], w * patch[1])}")
    hist = patch_histograms(labels.to(grid.device), n_classes, patch)  # [N, C, h, w]
    keys = F.normalize(grid.float().permute(0, 2, 3, 1).reshape(n, h * w, d), dim=-1)
    vals = hist.permute(0, 2, 3, 1).reshape(n, h * w, n_classes)
    if memory_size:
        per = memory_size // n
        if not 1 <= per <= h * w:
            raise UserError(f"memory_size {memory_size}: {per} patches per memory frame ({n} frames), but a frame has "
                            f"{h * w}; memory_size must be in {n}..{n * h * w}")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        idx = sample_memory(hist, per, sampling, gen)  # [N, K]
        keys = keys.gather(1, idx[..., None].expand(-1, -1, d))
        vals = vals.gather(1, idx[..., None].expand(-1, -1, n_classes))
    return Memory(keys.reshape(-1, d).contiguous(), vals.reshape(-1, n_classes).contiguous())


def retrieve(memory: Memory, grid: torch.Tensor, out_hw: tuple[int, int], k: int, temperature: float,
             budget: int, frames_per_chunk: int = 64) -> torch.Tensor:
    """Query features ``[N, D, h, w]`` -> ``[N, H, W]`` uint8 labels: k-NN vote, bilinear to ``out_hw``, argmax."""
    n, d, h, w = grid.shape
    c = memory.values.shape[1]
    preds = []
    for a in range(0, n, frames_per_chunk):
        g = grid[a: a + frames_per_chunk]
        q = F.normalize(g.float().permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
        y = knn_vote(q, memory.keys, memory.values, k, temperature, budget)
        y = y.reshape(g.shape[0], h, w, c).permute(0, 3, 1, 2)
        up = F.interpolate(y, size=tuple(out_hw), mode="bilinear", align_corners=False)
        preds.append(up.argmax(1).to(torch.uint8))
    return torch.cat(preds)


# ----------------------------------------------------------------------------------------------- the command
def write_per_class(path: Path, names: list[str], iou: np.ndarray, gt_pixels: np.ndarray,
                    pred_pixels: np.ndarray) -> None:
    from wtours.fsutil import atomic_open

    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(["class", "name", "IoU", "gt_pixels", "pred_pixels"])
    for i, nm in enumerate(names):
        wr.writerow([i, nm, "" if np.isnan(iou[i]) else f"{100 * iou[i]:.2f}", int(gt_pixels[i]), int(pred_pixels[i])])
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())


def segmentation_metrics(conf: np.ndarray, names: list[str], over: str) -> dict:
    """mIoU / IoU per class / pixel accuracy (percent) of a confusion matrix ``[C, C]`` (rows = GT)."""
    from wtours.eval.common import miou_from_confusion

    miou, iou = miou_from_confusion(conf, over)
    total = conf.sum()
    return {"mIoU": 100 * miou, "pixel_accuracy": 100 * float(np.trace(conf) / total) if total else float("nan"),
            "iou_per_class": {nm: (None if np.isnan(v) else 100 * float(v)) for nm, v in zip(names, iou)},
            "classes_absent": [nm for nm, r, c in zip(names, conf.sum(1), conf.sum(0)) if r == 0 and c == 0]}


def write_split_overlays(out_dir: Path, data, gt: np.ndarray, pred: np.ndarray, count: int) -> list[str]:
    """Overlays of the first ``count`` videos of ``data`` (frame | GT | prediction) -> paths relative to out_dir."""
    from wtours.eval.report import write_overlays
    from wtours.fsutil import ensure_dir

    pics, start = [], 0
    for s_i, seq in enumerate(data.sequences):
        n = len(seq.frames)
        if s_i < count:
            pics += [str(p.relative_to(out_dir)) for p in write_overlays(
                ensure_dir(out_dir / "overlays"), seq.name, seq.frames, gt[start: start + n], pred[start: start + n],
                gif=False)]
        start += n
    return pics


def evaluate_incontext(
    dataset: str = "ytvos",
    root: str | Path = "",
    checkpoint: str = "",
    out: str | Path | None = None,
    cfg: InContextConfig | None = None,
    arch: str | None = None,
    videos: str | Path | None = None,
    device: str = "auto",
    verbose: bool = True,
    trust: bool = False,
    memory_root: str | Path | None = None,
    feature_transform=None,
) -> dict:
    """Hummingbird in-context retrieval of ``checkpoint``: memory from the training split of ``root`` (or every
    video of ``memory_root``), queries from its held-out split -> the metrics dict (also ``<out>/metrics.json``).
    ``feature_transform``: ``FeatureSet -> FeatureSet`` applied after each extraction (e.g. the oracle
    :func:`wtours.eval.features.gt_patch_features`)."""
    from wtours.config import to_dict, to_yaml
    from wtours.eval.cli import resolve_device
    from wtours.eval.common import (Timer, budget as _budget, confusion_matrix, device_settings, encoder_identity,
                                    load_encoder, validated)
    from wtours.eval.features import extract_features
    from wtours.eval.splits import read_split
    from wtours.fsutil import ensure_dir, write_json, write_text

    cfg = validated(cfg or InContextConfig())
    t_start = time.perf_counter()
    dev = resolve_device(device)
    split = read_split(dataset, root, memory_root, videos, cfg.split, cfg.memory_frames_per_clip,
                       cfg.query_frames_per_clip, cfg.split_seed, cfg.missing_annotations, "in-context retrieval")
    model, info = load_encoder(checkpoint, arch, trust, verbose)
    patch = tuple(model.patch_embed.patch_size)
    in_hw = tuple(cfg.input_size)
    if in_hw[0] % patch[0] or in_hw[1] % patch[1]:
        raise UserError(f"input_size {list(in_hw)} is not a multiple of the patch size {patch[0]}")
    out_dir = ensure_dir(out or Path("runs") / "eval" / "incontext" / dataset)
    write_text(out_dir / "config.yaml", to_yaml(cfg))
    timer = Timer(dev)
    timer.lap("load")
    bud = _budget(cfg.memory_budget, dev)
    names = ["background"] + split.categories
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        def feats(ds):
            f = extract_features(model, ds, dev, in_hw, [in_hw], cfg.batch_size, cfg.workers, cfg.progress,
                                 tuple(cfg.mean), tuple(cfg.std), source=checkpoint)
            return f if feature_transform is None else feature_transform(f)

        mem_f = feats(split.train)
        timer.lap("features_memory")
        memory = build_memory(mem_f.grid, mem_f.gt[in_hw], split.n_classes, patch, cfg.memory_size,
                              cfg.memory_sampling, cfg.seed)
        del mem_f
        timer.lap("memory")
        q_f = feats(split.held)
        timer.lap("features_queries")
        pred = retrieve(memory, q_f.grid, in_hw, cfg.k, cfg.temperature, bud)
        gt = q_f.gt[in_hw]
        conf = confusion_matrix(pred, gt, split.n_classes, IGNORE).cpu().numpy()
        timer.lap("retrieval")
    finally:
        torch.set_float32_matmul_precision(prev)
    scores = segmentation_metrics(conf, names, cfg.miou_over)
    pictures = write_split_overlays(out_dir, split.held, gt.cpu().numpy(), pred.cpu().numpy(), cfg.overlays)
    timer.lap("pictures")
    timer.seconds["total"] = time.perf_counter() - t_start
    metrics = {
        "mIoU": scores["mIoU"], "unit": "%", "pixel_accuracy": scores["pixel_accuracy"],
        "iou_per_class": scores["iou_per_class"], "classes_absent": scores["classes_absent"],
        "n_classes": split.n_classes, "n_memory_frames": split.train.n_frames, "n_query_frames": split.held.n_frames,
        "memory_patches": int(memory.keys.shape[0]), "memory_bytes": int(memory.nbytes),
        "split": split.doc(),
        "settings": {"instrument": "incontext", "dataset": dataset, "root": str(root),
                     "memory_root": str(memory_root) if memory_root else None,
                     "videos": str(videos) if videos else None, "config": to_dict(cfg), **device_settings(dev),
                     "protocol": "Hummingbird dense NN retrieval (open-hummingbird-eval): cosine top-k, softmax "
                                 "over k with a temperature, class-histogram patch labels, one confusion matrix",
                     "notes": ["no memory augmentation (reference: 1 epoch of colour jitter + random resized crop)",
                               "exact search on the device (reference default: ScaNN, approximate)",
                               "no Hungarian matching of the predictions (open-hummingbird v2 applies one)",
                               f"mIoU over {cfg.miou_over} classes" + (" (absent from GT and predictions: 0)"
                                                                       if cfg.miou_over == "all" else "")]},
        "encoder": encoder_identity(checkpoint, info, model),
        "timing": timer.seconds, "pictures": pictures,
        "reference": {"source": "evals.md §2 (Pascal VOC, full data; not comparable to video sets)",
                      "methods": REFERENCE},
    }
    write_json(out_dir / "metrics.json", metrics)
    write_per_class(out_dir / "per_class.csv", names, np.array([np.nan if v is None else v / 100
                                                                for v in scores["iou_per_class"].values()]),
                    conf.sum(1), conf.sum(0))
    if verbose:
        print(f"encoder {info['spec']} ({info['arch']}), dataset {dataset}: memory {memory.keys.shape[0]} patches of "
              f"{split.train.n_frames} frames, {split.held.n_frames} query frames, {split.n_classes} classes")
        print(f"in-context mIoU {scores['mIoU']:.1f} % (k={cfg.k}, temperature {cfg.temperature}); pixel accuracy "
              f"{scores['pixel_accuracy']:.1f} %; split: {split.rule}")
        print(f"total {timer.seconds['total']:.1f} s on {dev}")
        print(f"wrote {out_dir / 'metrics.json'}")
    return metrics
