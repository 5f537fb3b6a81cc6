"""What the evaluation instruments share: loading the encoder (every checkpoint form of
:func:`wtours.models.weights.load_backbone`), its identity for ``metrics.json``, the device,
validated configs, and the mIoU of a confusion matrix as open-hummingbird-eval / NeCo compute it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from wtours.errors import ConfigError, UserError


def load_encoder(checkpoint: str, arch: str | None = None, trust: bool = False, verbose: bool = True):
    """-> (model in eval mode on CPU, info dict from ``load_backbone``); says which backbone of a training
    checkpoint is evaluated (its teacher unless ``:student``), as ``wtours eval clustering`` does."""
    from wtours.models.weights import load_backbone, split_spec

    model, info = load_backbone(checkpoint, arch, trust=trust)
    picked = (info.get("meta") or {}).get("checkpoint") or {}
    if verbose and "global_step" in picked:
        other = "student" if info.get("role") == "teacher" else "teacher"
        print(f"note: {split_spec(checkpoint)[0]} is a training checkpoint (step {picked['global_step']}): evaluating "
              f"its {info.get('role')}; append :{other} for the {other}")
    return model, info


def encoder_identity(checkpoint: str, info: dict, model: torch.nn.Module) -> dict:
    """The ``encoder`` entry of metrics.json: spec, kind, arch, role, meta, sha256 of the file, width, patch."""
    from wtours.eval.cli import _sha256
    from wtours.models.weights import split_spec

    enc = {k: v for k, v in info.items() if k != "meta"}
    enc["meta"] = info.get("meta") or {}
    enc["sha256"] = None if checkpoint.startswith("random:") else _sha256(split_spec(checkpoint)[0])
    enc["embed_dim"] = int(getattr(model, "embed_dim", 0) or model.num_features)
    enc["patch_size"] = list(model.patch_embed.patch_size)
    return enc


def device_settings(dev: torch.device) -> dict:
    return {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__}


def validated(cfg: Any) -> Any:
    """``cfg.validate()`` with its ValueError as a one-line :class:`ConfigError`."""
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def budget(setting: int, device: torch.device) -> int:
    """Elements allowed in the largest temporary (``setting``; 0 = 2^28 on CUDA, 2^25 on CPU)."""
    if setting:
        return int(setting)
    return 1 << 28 if device.type == "cuda" else 1 << 25


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, n_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``conf[g, p]`` int64 [C, C] of label maps of equal shape, ``ignore_index`` pixels of ``gt`` left out;
    predictions or labels outside ``0..C-1`` are an error of the caller (they cannot happen here)."""
    gt = gt.reshape(-1).long()
    pred = pred.reshape(-1).long()
    keep = gt != ignore_index
    idx = torch.where(keep, gt * n_classes + pred, torch.full_like(gt, n_classes * n_classes))
    return torch.bincount(idx, minlength=n_classes * n_classes + 1)[:-1].view(n_classes, n_classes)


def miou_from_confusion(conf: np.ndarray, over: str = "all") -> tuple[float, np.ndarray]:
    """-> (mIoU in [0, 1], IoU per class [C]) with the predictions taken as labels (no matching).

    ``over="all"`` (open-hummingbird-eval's ``PredsmIoU`` and NeCo's linear evaluation): IoU_c =
    TP / max(TP + FP + FN, eps) averaged over **all** C classes, so a class absent from both the ground truth
    and the predictions counts 0. ``over="present"``: the mean over classes that are in the ground truth or
    the predictions (the others are NaN in the returned IoUs either way)."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    iou = np.divide(tp, denom, out=np.full_like(tp, np.nan), where=denom > 0)
    if over == "all":
        return float(np.nan_to_num(iou, nan=0.0).mean()), iou
    if over == "present":
        return (float(np.nanmean(iou)) if (denom > 0).any() else float("nan")), iou
    raise ValueError(f"miou over must be 'all' or 'present', got {over!r}")


class Timer:
    """Wall seconds per named phase (device synchronised on CUDA)."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        t = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + t - self._t
        self._t = t


def check_dataset_kind(kind: str, allowed: tuple[str, ...], instrument: str, why: str = "") -> None:
    if kind not in ("davis", "ytvos", "synth"):
        raise UserError(f"unknown dataset '{kind}' (davis, ytvos or synth)")
    if kind not in allowed:
        raise UserError(f"--dataset {kind}: {instrument} needs {' or '.join(allowed)}" + (f" ({why})" if why else ""))
