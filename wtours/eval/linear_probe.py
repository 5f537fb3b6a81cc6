"""Linear segmentation probe on frozen patch features, scored by mIoU.

``wtours eval linear`` / :func:`evaluate_linear`. Protocol: NeCo's ``experiments/linear_segmentation``
(Pariza et al., ICLR 2025; the same as TimeT's ``linear_finetune.py`` and DINOv2's "lin." without its
BatchNorm); ``../shared/reference/evals.md`` §3. Splits: :mod:`wtours.eval.splits` (train on the training
split, score on the held-out split).

1. Frames resized (squashed) to ``input_size`` (448²), normalised with (0.485, 0.456, 0.406) / (0.229, 0.224,
   0.225); features = last block's patch tokens after the final norm ``[N, D, h, w]``, extracted **once** and
   kept on the device (the backbone is frozen, so the probe trains on cached features).
2. Head: ``Conv2d(D, C, 1)`` (a linear map per patch, with bias). Training: logits bilinearly upsampled to
   ``label_size`` (100²), cross-entropy with the GT nearest-resized to ``label_size``, ignore 255; SGD
   (lr 0.01, momentum 0.9, weight decay 1e-4), lr x 0.1 at each of ``lr_drop_epochs`` (20), ``epochs`` (25),
   batches of ``train_batch`` (128) frames in a seeded random order.
3. Evaluation: logits bilinearly upsampled to ``input_size``, argmax, one confusion matrix against the GT
   nearest-resized to ``input_size`` over all held-out pixels (ignore left out), mIoU over all C classes
   (``miou_over: all``, as NeCo's ``PredsmIoU(linear_probe=True)``: a class absent from both counts 0) or
   over the present ones.

The head runs at patch resolution and its logits are upsampled; NeCo upsamples the features and then applies
the 1x1 conv. Both are the same map (bilinear interpolation is linear with weights summing to 1, so it
commutes with a per-pixel affine map), this order is ``(label_size / h)²`` times cheaper.

Deterministic: the head's init and the batch order come from ``seed`` (own generators, the global RNG is
left alone); on CPU two runs give identical weights and scores.

Departures from the reference, and why: no training augmentation (NeCo: random resized crop 0.8-1 +
horizontal flip) since the features are computed once (what makes the probe cheap enough to run after every
stage); no BatchNorm (DINOv2's BNHead has one, NeCo's head does not); the schedule's length is in epochs of the
(small) training split, so presets for small sets raise ``epochs`` (``configs/eval/linear_tiny.yaml``).

Outputs (``--out``, default ``runs/eval/linear/<dataset>``): ``metrics.json`` (mIoU %, IoU per class, pixel
accuracy, train loss curve, split, settings, encoder identity, timing), ``per_class.csv``,
``overlays/<video>.png`` (frame | ground truth | probe).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from wtours.errors import UserError

NECO_MEAN = (0.485, 0.456, 0.406)
NECO_STD = (0.229, 0.224, 0.225)
IGNORE = 255
# mIoU %, Pascal VOC linear probe (evals.md §3; NeCo README)
REFERENCE = {"DINO ViT-S/16 (VOC)": None, "NeCo on DINO ViT-S/16 (VOC)": 65.8, "TimeT ViT-S/16 via NeCo (VOC)": 68.5,
             "NeCo DINOv2R ViT-S/14 (VOC)": 81.5}


@dataclass
class LinearConfig:
    """Settings of ``wtours eval linear`` (``configs/eval/linear*.yaml``, ``--set key=value``).
    Defaults: NeCo's linear segmentation (448² input, 100² labels, SGD 0.01, 25 epochs, drop at 20, batch 128)."""

    input_size: list[int] = field(default_factory=lambda: [448, 448])  # [H, W], squashed; also the scoring size
    label_size: list[int] = field(default_factory=lambda: [100, 100])  # training targets / logits size
    epochs: int = 25
    lr_drop_epochs: list[int] = field(default_factory=lambda: [20])  # lr x lr_drop_factor at each
    lr_drop_factor: float = 0.1
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    train_batch: int = 128  # frames per SGD step
    train_frames_per_clip: int = 4  # annotated frames per training video, evenly spaced (0: all)
    val_frames_per_clip: int = 4  # ... per held-out video
    split: Literal["auto", "alternate"] = "auto"
    split_seed: int = 0
    miou_over: Literal["all", "present"] = "all"
    mean: list[float] = field(default_factory=lambda: list(NECO_MEAN))
    std: list[float] = field(default_factory=lambda: list(NECO_STD))
    seed: int = 0  # head init and batch order
    batch_size: int = 64  # frames per forward pass of the backbone
    workers: int = 0
    missing_annotations: Literal["error", "skip"] = "error"
    overlays: int = 3
    progress: bool = True

    def validate(self) -> None:
        for name in ("input_size", "label_size"):
            v = getattr(self, name)
            if len(v) != 2 or min(v) < 1:
                raise ValueError(f"{name} must be [H, W] with positive values, got {v}")
        for name in ("epochs", "train_batch", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("train_frames_per_clip", "val_frames_per_clip", "workers", "overlays"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.momentum < 0 or self.weight_decay < 0 or not self.lr_drop_factor > 0:
            raise ValueError("lr and lr_drop_factor must be > 0, momentum and weight_decay >= 0")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean / std must be 3 values (std > 0), got {self.mean} / {self.std}")


def train_probe(grid: torch.Tensor, labels: torch.Tensor, n_classes: int, cfg: LinearConfig
                ) -> tuple[torch.nn.Conv2d, list[float]]:
    """Train the 1x1-conv head on cached features ``grid`` ``[N, D, h, w]`` with targets ``labels`` ``[N, Hl, Wl]``
    (255 ignored) -> (head, mean loss per epoch). Seeded, fp32."""
    n, d, h, w = grid.shape
    dev = grid.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        head = torch.nn.Conv2d(d, n_classes, 1)
    head = head.to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=sorted(cfg.lr_drop_epochs), gamma=cfg.lr_drop_factor)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(cfg.seed) + 1)
    target_hw = tuple(labels.shape[-2:])
    labels = labels.to(dev).long()
    if not (labels != IGNORE).any():
        raise UserError("the training split has no labelled pixel (every pixel is ignore 255)")
    losses = []
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        total, count = 0.0, 0
        for a in range(0, n, cfg.train_batch):
            idx = order[a: a + cfg.train_batch]
            logits = F.interpolate(head(grid[idx].float()), size=target_hw, mode="bilinear", align_corners=False)
            y = labels[idx]
            if not (y != IGNORE).any():
                continue
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        sched.step()
        losses.append(total / max(count, 1))
    if not all(math.isfinite(v) for v in losses):
        raise UserError(f"the linear probe diverged (loss {losses[-1]}); lower lr")
    return head, losses


@torch.no_grad()
def predict_probe(head: torch.nn.Conv2d, grid: torch.Tensor, out_hw: tuple[int, int],
                  frames_per_chunk: int = 32) -> torch.Tensor:
    """``[N, D, h, w]`` -> ``[N, H, W]`` uint8: logits bilinear to ``out_hw``, argmax."""
    preds = []
    for a in range(0, grid.shape[0], frames_per_chunk):
        logits = F.interpolate(head(grid[a: a + frames_per_chunk].float()), size=tuple(out_hw), mode="bilinear",
                               align_corners=False)
        preds.append(logits.argmax(1).to(torch.uint8))
    return torch.cat(preds)


def evaluate_linear(
    dataset: str = "ytvos",
    root: str | Path = "",
    checkpoint: str = "",
    out: str | Path | None = None,
    cfg: LinearConfig | None = None,
    arch: str | None = None,
    videos: str | Path | None = None,
    device: str = "auto",
    verbose: bool = True,
    trust: bool = False,
    memory_root: str | Path | None = None,
    feature_transform=None,
) -> dict:
    """Linear probe of ``checkpoint``: trained on the training split of ``root`` (or every video of
 ``memory_root``), mIoU on its held-out split -> the metrics dict (also ``<out>/metrics.json``)."""
    from wtours.config import to_dict, to_yaml
    from wtours.eval.cli import resolve_device
    from wtours.eval.common import (Timer, confusion_matrix, device_settings, encoder_identity, load_encoder,
                                    validated)
    from wtours.eval.features import extract_features
    from wtours.eval.incontext import segmentation_metrics, write_per_class, write_split_overlays
    from wtours.eval.splits import read_split
    from wtours.fsutil import ensure_dir, write_json, write_text

    cfg = validated(cfg or LinearConfig())
    t_start = time.perf_counter()
    dev = resolve_device(device)
    split = read_split(dataset, root, memory_root, videos, cfg.split, cfg.train_frames_per_clip,
                       cfg.val_frames_per_clip, cfg.split_seed, cfg.missing_annotations, "the linear probe")
    model, info = load_encoder(checkpoint, arch, trust, verbose)
    patch = tuple(model.patch_embed.patch_size)
    in_hw, lab_hw = tuple(cfg.input_size), tuple(cfg.label_size)
    if in_hw[0] % patch[0] or in_hw[1] % patch[1]:
        raise UserError(f"input_size {list(in_hw)} is not a multiple of the patch size {patch[0]}")
    out_dir = ensure_dir(out or Path("runs") / "eval" / "linear" / dataset)
    write_text(out_dir / "config.yaml", to_yaml(cfg))
    timer = Timer(dev)
    timer.lap("load")
    names = ["background"] + split.categories

    def feats(ds, sizes):
        f = extract_features(model, ds, dev, in_hw, sizes, cfg.batch_size, cfg.workers, cfg.progress,
                             tuple(cfg.mean), tuple(cfg.std), source=checkpoint)
        return f if feature_transform is None else feature_transform(f)

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        tr = feats(split.train, [lab_hw])
        timer.lap("features_train")
        with torch.enable_grad():
            head, losses = train_probe(tr.grid, tr.gt[lab_hw], split.n_classes, cfg)
        del tr
        timer.lap("train")
        va = feats(split.held, [in_hw])
        timer.lap("features_val")
        pred = predict_probe(head, va.grid, in_hw)
        gt = va.gt[in_hw]
        conf = confusion_matrix(pred, gt, split.n_classes, IGNORE).cpu().numpy()
        timer.lap("evaluate")
    finally:
        torch.set_float32_matmul_precision(prev)
    scores = segmentation_metrics(conf, names, cfg.miou_over)
    pictures = write_split_overlays(out_dir, split.held, gt.cpu().numpy(), pred.cpu().numpy(), cfg.overlays)
    timer.lap("pictures")
    timer.seconds["total"] = time.perf_counter() - t_start
    steps = cfg.epochs * math.ceil(split.train.n_frames / cfg.train_batch)
    metrics = {
        "mIoU": scores["mIoU"], "unit": "%", "pixel_accuracy": scores["pixel_accuracy"],
        "iou_per_class": scores["iou_per_class"], "classes_absent": scores["classes_absent"],
        "n_classes": split.n_classes, "n_train_frames": split.train.n_frames, "n_val_frames": split.held.n_frames,
        "train_loss": losses, "steps": steps, "split": split.doc(),
        "settings": {"instrument": "linear", "dataset": dataset, "root": str(root),
                     "memory_root": str(memory_root) if memory_root else None,
                     "videos": str(videos) if videos else None, "config": to_dict(cfg), **device_settings(dev),
                     "protocol": "NeCo linear segmentation: frozen final-norm patch tokens -> 1x1 conv, bilinear "
                                 "logits, CE (ignore 255), SGD with a step schedule; mIoU at input_size",
                     "notes": ["features cached once: no training augmentation (reference: random resized crop "
                               "0.8-1 + hflip)",
                               "1x1 conv before the bilinear upsampling (the same map as after it)",
                               f"mIoU over {cfg.miou_over} classes" + (" (absent from GT and predictions: 0)"
                                                                       if cfg.miou_over == "all" else "")]},
        "encoder": encoder_identity(checkpoint, info, model),
        "timing": timer.seconds, "pictures": pictures,
        "reference": {"source": "evals.md §3 (Pascal VOC; not comparable to video sets)",
                      "methods": {k: v for k, v in REFERENCE.items() if v is not None}},
    }
    write_json(out_dir / "metrics.json", metrics)
    write_per_class(out_dir / "per_class.csv", names, np.array([np.nan if v is None else v / 100
                                                                for v in scores["iou_per_class"].values()]),
                    conf.sum(1), conf.sum(0))
    if verbose:
        print(f"encoder {info['spec']} ({info['arch']}), dataset {dataset}: trained on {split.train.n_frames} frames "
              f"({steps} steps, final loss {losses[-1]:.3f}), scored on {split.held.n_frames} frames, "
              f"{split.n_classes} classes")
        print(f"linear probe mIoU {scores['mIoU']:.1f} %; pixel accuracy {scores['pixel_accuracy']:.1f} %; "
              f"split: {split.rule}")
        print(f"total {timer.seconds['total']:.1f} s on {dev}")
        print(f"wrote {out_dir / 'metrics.json'}")
    return metrics
