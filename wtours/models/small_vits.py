"""Small ViTs for CPU-scale runs, registered with timm by name.

timm's smallest ViTs (``vit_tiny_patch16_224``: 5.7 M parameters, patch 16) see a 64 px crop as
4 x 4 tokens: too coarse for dense features, and too slow on a CPU at finer patches
(``vit_small_patch8_224``: 22 M). These are plain timm ``VisionTransformer`` configurations
(pre-norm blocks, [CLS] token, learned position embedding, no registers), registered under their
own names when :mod:`wtours.models` is imported, so ``timm.create_model(name)`` and the
``random:<name>`` baseline build them like any timm ViT:

=======================  =====  =====  =====  =====  ==========  =========
name                     patch  width  depth  heads  input size  parameters
=======================  =====  =====  =====  =====  ==========  =========
``vit_nano_patch8_64``   8      128    6      4      64          1.2 M
=======================  =====  =====  =====  =====  ==========  =========

They are registered by ``import wtours`` (and ``import wtours.models``). A ``backbone.pt`` of one loads
into timm after ``import wtours`` as ``timm.create_model(ckpt["arch"], num_classes=0)``, or without wtours
as ``timm.create_model(meta["timm_base"], **meta["timm_kwargs"], num_classes=0)``, i.e.
``timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4,
num_classes=0)`` (the same module tree and state-dict keys).
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

#: the timm ViT that the keyword arguments of :data:`SMALL_VITS` reshape (exports record both: ``meta["timm_base"]``)
TIMM_BASE = "vit_tiny_patch16_224"
#: name -> VisionTransformer keyword arguments
SMALL_VITS: dict[str, dict[str, Any]] = {
    "vit_nano_patch8_64": dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4),
}


def _cfg(size: int) -> dict[str, Any]:
    return {"url": "", "num_classes": 1000, "input_size": (3, size, size), "pool_size": None,
            "crop_pct": 1.0, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "mit"}


default_cfgs = generate_default_cfgs({name: _cfg(kw["img_size"]) for name, kw in SMALL_VITS.items()})


def _build(name: str, pretrained: bool, **kwargs: Any) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"'{name}' has no pretrained weights (a wtours CPU-scale ViT)")
    return _create_vision_transformer(name, pretrained=False, **dict(SMALL_VITS[name], **kwargs))


if "vit_nano_patch8_64" not in timm.list_models("vit_nano_patch8_64"):
    @register_model
    def vit_nano_patch8_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        """ViT-nano/8 at 64 px: width 128, 6 blocks, 4 heads (CPU proofs and demos)."""
        return _build("vit_nano_patch8_64", pretrained, **kwargs)
