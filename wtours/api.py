"""The Python API: what a notebook needs, with keyword arguments (also reachable as ``wtours.<name>``).

    import wtours
    model = wtours.load_backbone("runs/demo/video/stage1/backbone.pt")       # a timm ViT, eval mode
    feats = wtours.extract_features(model, images)                          # [B, D, H/p, W/p]
    m = wtours.evaluate("clustering", dataset="synth", root="runs/demo/data/synth",
                        checkpoint="runs/demo/video/stage1/backbone.pt", config="eval/tiny")
    m["C"], m["F"], m["D"]

``evaluate`` runs the same code as ``wtours eval <instrument>`` (outputs in ``out``, a temporary folder when
not given) and returns its ``metrics.json`` as a dict; ``evaluate_clustering`` & co. are the per-instrument
functions themselves (keyword arguments: ``dataset``, ``root``, ``checkpoint``, ``out``, ``cfg``, ``arch``,
``videos``, ``device``, ``verbose``, ``trust``, ``feature_transform``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from wtours.errors import UserError


def load_backbone(checkpoint: str | Path, arch: str | None = None, device: str | torch.device = "cpu",
                  trust: bool = False) -> torch.nn.Module:
    """A timm ViT in eval mode from any checkpoint form ``wtours eval`` takes: a ``backbone.pt``, a training
    checkpoint (``last.ckpt``, its teacher; ``last.ckpt:student``), a timm / DINO / DINOv2 state dict file, or
    ``random:<arch>[@<seed>]``. ``arch``: the timm name for a bare state dict (default: inferred)."""
    from wtours.models.weights import load_backbone as _load

    model, _ = _load(str(checkpoint), arch=arch, trust=trust)
    return model.to(device).eval()


def _as_batch(images: Any) -> torch.Tensor:
    """``[B, 3, H, W]`` float in [0, 1] from a tensor (``[3, H, W]`` or ``[B, 3, H, W]``, float in [0, 1] or
    uint8), a numpy array (``[H, W, 3]`` / ``[B, H, W, 3]`` uint8), a PIL image, or a list of those."""
    if isinstance(images, (list, tuple)):
        parts = [_as_batch(im) for im in images]
        if len({p.shape[-2:] for p in parts}) > 1:
            raise UserError("extract_features: images of different sizes; give size=(H, W) to resize them")
        return torch.cat(parts)
    if not isinstance(images, (torch.Tensor, np.ndarray)):  # a PIL image
        images = np.asarray(images.convert("RGB"))
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images))
        x = x.permute(2, 0, 1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    else:
        x = images
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise UserError(f"extract_features: expected RGB images [B, 3, H, W] or [B, H, W, 3], got {tuple(x.shape)}")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: Any, size: tuple[int, int] | None = None,
                     batch_size: int = 32, normalize: bool = True, device: str | torch.device | None = None
                     ) -> torch.Tensor:
    """Last-layer patch tokens (after the final norm) of ``images`` -> ``[B, D, H/p, W/p]`` float32 on the CPU.

    ``images``: see :func:`_as_batch` (RGB in [0, 1] or uint8). ``size``: resize to ``(H, W)`` first (bilinear,
    antialiased); without it, each side is floored to a multiple of the patch size. ``normalize``: ImageNet mean
    / std (what wtours' encoders are trained with). ``device``: the model's own by default."""
    import torch.nn.functional as F

    from wtours.eval.features import patch_tokens

    x = _as_batch(images)
    p = model.patch_embed.patch_size
    if size is not None:
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    h, w = (x.shape[-2] // p[0]) * p[0], (x.shape[-1] // p[1]) * p[1]
    if h == 0 or w == 0:
        raise UserError(f"extract_features: images of {tuple(x.shape[-2:])} px are smaller than a patch ({p})")
    x = x[..., :h, :w]
    if normalize:
        from wtours.train.augment import normalize as imagenet_normalize

        x = imagenet_normalize(x)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    out = [patch_tokens(model, chunk.to(dev)).float().cpu() for chunk in x.split(batch_size)]
    return torch.cat(out)


def _instrument(name: str) -> tuple[Any, Any]:
    """``(evaluate function, config class)`` of an instrument."""
    if name == "clustering":
        from wtours.eval.cli import evaluate_clustering as fn
        from wtours.eval.config import EvalConfig as cls
    elif name == "propagation":
        from wtours.eval.propagation import PropagationConfig as cls, evaluate_propagation as fn
    elif name == "incontext":
        from wtours.eval.incontext import InContextConfig as cls, evaluate_incontext as fn
    elif name == "linear":
        from wtours.eval.linear_probe import LinearConfig as cls, evaluate_linear as fn
    else:
        raise UserError(f"unknown instrument {name!r}; choose clustering, propagation, incontext or linear")
    return fn, cls


def evaluate(instrument: str, *, dataset: str, root: str | Path, checkpoint: str | Path,
             out: str | Path | None = None, config: str | Path | None = None,
             overrides: Mapping[str, Any] | Sequence[str] = (), device: str = "auto", verbose: bool = False,
             **kwargs: Any) -> dict:
    """Run one instrument (``clustering``, ``propagation``, ``incontext``, ``linear``) as ``wtours eval`` does ->
    its metrics dict. ``config``: a preset name under ``configs/`` (``"eval/tiny"``) or a YAML path;
    ``overrides``: ``{"key": value}`` or ``["key=value"]`` on top of it; ``kwargs`` go to the instrument's
    function (``arch``, ``videos``, ``trust``, ``feature_transform``)."""
    from wtours.config import load_config

    fn, cls = _instrument(instrument)
    if isinstance(overrides, Mapping):
        import yaml

        overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                     for k, v in overrides.items()]
    cfg = load_config(cls, str(config) if config is not None else None, list(overrides))
    if out is not None:
        return fn(dataset=dataset, root=root, checkpoint=str(checkpoint), out=out, cfg=cfg, device=device,
                  verbose=verbose, **kwargs)
    with tempfile.TemporaryDirectory(prefix=f"wtours-{instrument}-") as tmp:
        return fn(dataset=dataset, root=root, checkpoint=str(checkpoint), out=tmp, cfg=cfg, device=device,
                  verbose=verbose, **kwargs)
