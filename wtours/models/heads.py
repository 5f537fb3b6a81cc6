"""DINO projection head (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021), as used unchanged by DoRA (Venkataramanan et al., ICLR 2024).

``[M, in_dim]`` -> MLP ``in_dim -> 2048 -> 2048 -> 256`` (GELU, no BN) -> L2 normalise ->
weight-normalised linear ``256 -> out_dim`` (no bias, ``g`` initialised to 1) -> ``[M, out_dim]``.

``norm_last_layer=True`` freezes ``g`` (the rows of the last layer then have unit norm).
DoRA's student uses ``False``. The last layer is exposed as ``head.last_layer`` and its
parameter names contain ``"last_layer"``, so a trainer can zero its grads during epoch 0.

Example::

    head = DINOHead(384, out_dim=65536)
    logits = head(cls_tokens)          # [M, 65536]

Departure from the reference: ``torch.nn.utils.parametrizations.weight_norm`` instead of the
deprecated ``torch.nn.utils.weight_norm`` (same maths; parameters ``original0`` = g,
``original1`` = v).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """3-layer MLP + L2-norm + weight-normalised prototypes layer (see module docstring)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, norm_last_layer: bool = False) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)
        self.out_dim = out_dim
        self.norm_last_layer = norm_last_layer

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, in_dim]`` -> ``[M, out_dim]``."""
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
