"""timm ViT exposing what DoRA's multi-object tracker needs, with fused (SDPA) attention.

The backbone is a plain ``timm`` VisionTransformer built by name with random init
(``dynamic_img_size=True``, so 112/96 px local crops work with an interpolated position
embedding; ``num_classes=0``). Its state dict is therefore timm's own (``model.vit``), which is
what :func:`wtours.models.weights.export_backbone` writes.

``forward_tracking`` (teacher, under ``no_grad``) returns a :class:`TrackingOutput`:

====================  ==================  ===================================================
field                 shape               meaning
====================  ==================  ===================================================
``cls``               ``[B, D]``          [CLS] after the final norm (same as ``forward``)
``patches``           ``[B, N, D]``       patch tokens after the final norm (prefix removed)
``q``                 ``[B, h, N, dh]``   last block's patch queries (from its ``norm1``
                                          input, after ``q_norm``), as its attention sees them
``k``                 ``[B, h, N, dh]``   last block's patch keys (same)
``q_cls``             ``[B, h, dh]``      last block's [CLS] query
``cls_attn``          ``[B, h, N]``       softmax over all prefix+N keys of the [CLS] query
                                          row, restricted to the patches (sums slightly < 1)
====================  ==================  ===================================================

Only one attention row is computed explicitly: the ``[B, h, N+1, N+1]`` matrix is never
materialised; the last block's output itself still comes from ``F.scaled_dot_product_attention``.
This replaces the reference's per-block attention/q/k buffers (DoRA ``vision_transformer.py``).

Position embeddings at other input sizes (DoRA's 112 px local crops: a 7x7 grid from the 14x14 one) are
interpolated as DINO (and DoRA, whose ViT is DINO's) does, by default (``pos_interp="dino"``,
:func:`dino_resample_pos_embed`): bicubic, no antialiasing, with the *scale factor*
``(grid + 0.1) / old_grid`` rather than the output size, which places the samples slightly differently.
timm's own resampling (``pos_interp="timm"``: bicubic with ``antialias=True`` to the output size) differs
from it by ~9 % (relative L2) on a trained ViT-S/16 at 112 px. An exported ``backbone.pt`` run by plain
timm at a non-native size uses timm's; at the native size (224 for ViT-S/16) nothing is interpolated.

Example::

    teacher = TrackingViT("vit_small_patch16_224")
    with torch.no_grad():
        out = teacher.forward_tracking(frames)     # frames [B*T, 3, 224, 224]
    out.k.shape                                    # [B*T, 6, 196, 64]
"""

from __future__ import annotations

import types
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wtours.models.weights import create_vit


class TrackingOutput(NamedTuple):
    """What the DoRA tracker reads from the teacher (see the module docstring for shapes)."""

    cls: torch.Tensor
    patches: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    q_cls: torch.Tensor
    cls_attn: torch.Tensor


def dino_resample_pos_embed(pos_embed: torch.Tensor, new_size: tuple[int, int], old_size: tuple[int, int],
                            num_prefix_tokens: int = 1) -> torch.Tensor:
    """``pos_embed [1, P + h*w, D]`` for a ``new_size`` patch grid, as DINO's ``interpolate_pos_encoding``.

    Prefix entries (CLS) are kept; the ``old_size`` grid is resized with ``F.interpolate(mode="bicubic",
    scale_factor=(new + 0.1) / old, align_corners=False, antialias=False)`` (the +0.1 of DINO's issue #8
    makes the output exactly ``new_size``; the scale factor, not the size, sets where it samples), in fp32.
    Returns the same grid unchanged (no copy) when the sizes match, as DINO does."""
    if tuple(new_size) == tuple(old_size):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    (nh, nw), (oh, ow) = new_size, old_size
    x = grid.float().reshape(1, oh, ow, dim).permute(0, 3, 1, 2)
    x = F.interpolate(x, scale_factor=((nh + 0.1) / oh, (nw + 0.1) / ow), mode="bicubic", align_corners=False,
                      recompute_scale_factor=False)
    if tuple(x.shape[-2:]) != (nh, nw):  # cannot happen for grids < 10^4 (the +0.1)
        raise RuntimeError(f"position-embedding interpolation gave {tuple(x.shape[-2:])}, wanted {(nh, nw)}")
    x = x.permute(0, 2, 3, 1).reshape(1, nh * nw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, x], dim=1)


def _pos_embed_dino(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``VisionTransformer._pos_embed`` (dynamic image size, NHWC patch tokens ``[B, h, w, D]``) with
    :func:`dino_resample_pos_embed` in place of timm's resampling; bound to a model by
    :func:`use_dino_pos_interp_`."""
    to_cat = []
    if vit.cls_token is not None:
        to_cat.append(vit.cls_token.expand(x.shape[0], -1, -1))
    if vit.reg_token is not None:
        to_cat.append(vit.reg_token.expand(x.shape[0], -1, -1))
    b, h, w, c = x.shape
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    pos = dino_resample_pos_embed(vit.pos_embed, (h, w), tuple(vit.patch_embed.grid_size), prefix)
    x = x.reshape(b, h * w, c)
    if vit.no_embed_class:
        x = x + pos
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
    else:
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
        x = x + pos
    return vit.pos_drop(x)


def use_dino_pos_interp_(vit: nn.Module) -> nn.Module:
    """Make a timm ViT built with ``dynamic_img_size=True`` interpolate its position embedding as DINO does
    (:func:`dino_resample_pos_embed`) in ``forward_features`` and everything built on it; state dict unchanged."""
    if not getattr(vit, "dynamic_img_size", False) or getattr(vit, "pos_embed", None) is None:
        raise ValueError("DINO position-embedding interpolation needs a timm ViT with dynamic_img_size=True and a "
                         "learned position embedding")
    vit._pos_embed = types.MethodType(_pos_embed_dino, vit)
    return vit


class TrackingViT(nn.Module):
    """A timm ViT (``self.vit``) plus the last-block queries/keys and [CLS] attention row.

    Args:
        arch: timm model name, e.g. ``"vit_small_patch16_224"``.
        drop_path_rate: stochastic depth (student 0.1, teacher 0 in DoRA).
        img_size: the nominal input size (position-embedding grid); other sizes are interpolated.
        pos_interp: how: ``"dino"`` (DINO / DoRA, default) or ``"timm"`` (see the module docstring).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2, embed_dim=48`` for tests).
    """

    def __init__(self, arch: str = "vit_small_patch16_224", drop_path_rate: float = 0.0,
                 img_size: int = 224, pos_interp: Literal["dino", "timm"] = "dino", **timm_kwargs: Any) -> None:
        super().__init__()
        timm_kwargs.setdefault("dynamic_img_size", True)
        timm_kwargs.setdefault("num_classes", 0)
        self.arch = arch
        self.vit = create_vit(arch, drop_path_rate=drop_path_rate, img_size=img_size, **timm_kwargs)
        if pos_interp not in ("dino", "timm"):
            raise ValueError(f"pos_interp must be 'dino' or 'timm', got {pos_interp!r}")
        self.pos_interp = pos_interp
        if pos_interp == "dino":
            use_dino_pos_interp_(self.vit)
        if getattr(self.vit, "cls_token", None) is None:
            raise ValueError(f"'{arch}' has no [CLS] token; TrackingViT needs one")
        last = self.vit.blocks[-1]
        attn = last.attn
        from timm.models.vision_transformer import Attention, Block

        # forward_tracking re-implements the last block, so it must be exactly timm's pre-norm Block.
        if type(last) is not Block or type(attn) is not Attention or getattr(attn, "gate", None) is not None:
            raise ValueError(f"'{arch}': the last block is {type(last).__name__}/{type(attn).__name__}; "
                             "TrackingViT supports standard timm ViT blocks (Block/Attention) only")
        for blk in self.vit.blocks:  # SDPA everywhere, whatever TIMM_FUSED_ATTN says
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = True
        self.embed_dim: int = int(self.vit.embed_dim)
        self.num_heads: int = int(attn.num_heads)
        self.head_dim: int = int(attn.head_dim)
        self.patch_size: int = int(self.vit.patch_embed.patch_size[0])
        self.num_prefix_tokens: int = int(self.vit.num_prefix_tokens)

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """Patch grid ``(H/p, W/p)`` of an ``h x w`` input."""
        return h // self.patch_size, w // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, D]`` [CLS] after the final norm."""
        return self.vit.forward_features(x)[:, 0]

    def forward_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, N, D]`` patch tokens after the final norm (prefix tokens dropped): the
        dense features TimeT trains and the clustering evaluation reads."""
        return self.vit.forward_features(x)[:, self.num_prefix_tokens:]

    def _tokens_before_last_block(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v.patch_embed(x)
        x = v._pos_embed(x)
        x = v.patch_drop(x)
        x = v.norm_pre(x)
        for blk in v.blocks[:-1]:
            x = blk(x)
        return x

    def forward_tracking(self, x: torch.Tensor) -> TrackingOutput:
        """``[B, 3, H, W]`` -> :class:`TrackingOutput` (teacher side; call under ``no_grad``)."""
        x = self._tokens_before_last_block(x)
        blk = self.vit.blocks[-1]
        attn = blk.attn
        b, n1, _ = x.shape
        h, dh, p = attn.num_heads, attn.head_dim, self.num_prefix_tokens

        # Last block, written out so its q/k can be returned (mirrors timm Block/Attention).
        y = blk.norm1(x)
        qkv = attn.qkv(y).reshape(b, n1, 3, h, dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0)
        o = o.transpose(1, 2).reshape(b, n1, h * dh)
        o = attn.proj_drop(attn.proj(attn.norm(o)))
        x = x + blk.drop_path1(blk.ls1(o))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        x = self.vit.norm(x)

        # One attention row: [CLS] query against all keys, fp32 softmax, patches kept.
        with torch.autocast(device_type=x.device.type, enabled=False):
            q_cls = q[:, :, 0]
            logits = torch.einsum("bhd,bhnd->bhn", q_cls.float(), k.float()) * attn.scale
            cls_attn = logits.softmax(dim=-1)[:, :, p:]
        return TrackingOutput(cls=x[:, 0], patches=x[:, p:], q=q[:, :, p:], k=k[:, :, p:],
                              q_cls=q_cls, cls_attn=cls_attn)
