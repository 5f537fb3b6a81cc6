"""``pixels:<patch>[@<position weight>]``: a pseudo-encoder of raw pixel colour (+ position), the floor every
dense instrument is calibrated against (``wtours bench instruments``).

It has the interface the evaluation reads from a timm ViT: ``patch_embed.patch_size``, ``num_prefix_tokens``
(1, a zero "CLS" token), ``embed_dim`` / ``num_features`` and ``forward_features(x) -> [B, 1 + h*w, D]``.
Per patch of ``p x p`` input pixels (the normalised image the instruments feed): the mean of each colour
channel, their standard deviation (texture), and, with a position weight ``w > 0``, the patch centre's
``(y, x)`` in ``[-1, 1]`` times ``w``: ``D = 6`` or ``8``. No parameters, nothing learned.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from wtours.errors import UserError


class PixelEncoder(torch.nn.Module):
    num_prefix_tokens = 1

    def __init__(self, patch: int = 8, position_weight: float = 1.0):
        super().__init__()
        if patch < 1:
            raise UserError(f"pixels:{patch}: the patch size must be >= 1")
        self.patch_embed = SimpleNamespace(patch_size=(patch, patch))
        self.position_weight = float(position_weight)
        self.embed_dim = self.num_features = 6 + (2 if self.position_weight > 0 else 0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_embed.patch_size[0]
        x = x.float()
        mean = F.avg_pool2d(x, p, p)
        std = (F.avg_pool2d(x * x, p, p) - mean * mean).clamp_min(0).sqrt()
        feats = [mean, std]
        b, _, h, w = mean.shape
        if self.position_weight > 0:
            ys = torch.linspace(-1, 1, h, device=x.device).view(1, 1, h, 1).expand(b, 1, h, w)
            xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, 1, w).expand(b, 1, h, w)
            feats += [self.position_weight * ys, self.position_weight * xs]
        tokens = torch.cat(feats, 1).flatten(2).transpose(1, 2)  # [B, h*w, D]
        return torch.cat([tokens.new_zeros(b, 1, tokens.shape[-1]), tokens], 1)


def parse_pixels_spec(spec: str) -> PixelEncoder:
    """``pixels:8`` (patch 8, position weight 1), ``pixels:8@0`` (colour only), ``pixels:16@0.5``."""
    body = spec.split(":", 1)[1]
    patch_txt, _, w_txt = body.partition("@")
    try:
        patch = int(patch_txt)
        weight = float(w_txt) if w_txt else 1.0
    except ValueError:
        raise UserError(f"{spec}: expected pixels:<patch size>[@<position weight>], e.g. pixels:8 or pixels:8@0") from None
    return PixelEncoder(patch, weight)
