"""The projection heads of every objective: :class:`DINOHead` (DINO / DoRA), :class:`ProjectionHead` (NeCo,
Pariza et al., ICLR 2025) and :class:`TimeTHead` (TimeT, Salehi et al., ICCV 2023), on :func:`gelu_mlp`.

DINO projection head (Caron et al., "Emerging Properties in Self-Supervised Vision
Transformers", ICCV 2021), as used unchanged by DoRA (Venkataramanan et al., ICLR 2024).

``[M, in_dim]`` -> MLP ``in_dim -> 2048 -> 2048 -> 256`` (GELU, no BN) -> L2 normalise ->
weight-normalised linear ``256 -> out_dim`` (no bias, ``g`` initialised to 1) -> ``[M, out_dim]``.

``norm_last_layer=True`` freezes ``g`` (the rows of the last layer then have unit norm).
DoRA's student uses ``False``. The last layer is exposed as ``head.last_layer`` and its
parameter names contain ``"last_layer"``, so a trainer can zero its grads during epoch 0.

Example::

    head = DINOHead(384, out_dim=65536)
    logits = head(cls_tokens)          # [M, 65536]

Precision (``fp32``): the logits are always fp32 ``[M, out_dim]``; what runs in fp32 with autocast off
(weights are fp32 parameters anyway):

* ``"head"`` (default): the whole head (MLP, L2 normalisation, prototypes layer);
* ``"last_layer"``: the normalisation and the prototypes layer; the MLP in the caller's autocast dtype;
* ``"off"``: everything in the caller's autocast dtype (bf16 logits on CUDA), as before issue 12.

Why: KL(q_fp32 || q) of the teacher targets ``softmax(t / 0.04)`` of a 65,536-prototype head on 256
bf16-rounded [CLS] vectors (as a bf16 backbone hands them over), mean / max over rows, for targets of
entropy 2.3 and 0.37 nats (the last layer's g set to 4 and 16, as training sharpens them):

=====================  =====================  =====================
under autocast         entropy 2.3 nats       entropy 0.37 nats
=====================  =====================  =====================
bf16, ``"off"``        1.0e-3 / 4.3e-3        4.2e-3 / 7.7e-2
bf16, ``"last_layer"`` 3.7e-4 / 1.5e-3        1.8e-3 / 2.3e-2
bf16, ``"head"``       4.0e-5 / 1.6e-4        2.1e-4 / 2.5e-3
fp16, ``"off"``        1.6e-5 / 1.3e-4        8.2e-5 / 1.8e-3
=====================  =====================  =====================

``"last_layer"`` removes only the logits' rounding: the bf16 MLP's rounding of the 256-d bottleneck is
amplified alike by the sharp softmax. ``"head"`` leaves what the bf16 [CLS] brings in. Cost: ~45 MFLOP per row in fp32
(the prototypes layer is 3/4 of it) instead of bf16: with DoRA's 128 teacher + 1,152 student rows per
step (fwd + bwd) about 160 GFLOP of fp32 matmul, a few ms on an H100/H200 (a few % of a ViT-S/16
step); "last_layer" saves a quarter of that. The fp32 matmuls follow
``torch.set_float32_matmul_precision`` (TF32 at "high" rounds like fp16; wtours keeps the default).

Departure from the reference: ``torch.nn.utils.parametrizations.weight_norm`` instead of the
deprecated ``torch.nn.utils.weight_norm`` (same maths; parameters ``original0`` = g,
``original1`` = v); the reference runs the whole head under fp16 autocast (its last layer and logits in fp16).
"""

from __future__ import annotations

import contextlib

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _fp32(x: torch.Tensor):
    """Autocast off on ``x``'s device (a no-op context where autocast does not exist, e.g. ``meta``)."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


def gelu_mlp(dims: Sequence[int]) -> nn.Sequential:
    """Linear layers ``dims[0] -> dims[1] -> ... -> dims[-1]`` with GELU between them (none after the
    last); weights truncated-normal (std 0.02), biases zero (the TimeT and NeCo projection heads)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.GELU())
    mlp = nn.Sequential(*layers)
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return mlp


class DINOHead(nn.Module):
    """3-layer MLP + L2-norm + weight-normalised prototypes layer (see module docstring)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3, norm_last_layer: bool = False,
                 fp32: Literal["head", "last_layer", "off"] = "head") -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if fp32 not in ("head", "last_layer", "off"):
            raise ValueError(f"fp32 must be 'head', 'last_layer' or 'off', got {fp32!r}")
        self.fp32 = fp32
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

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, in_dim]`` -> the MLP's output ``[M, bottleneck_dim]`` (before the L2 normalisation)."""
        if self.fp32 == "head":
            with _fp32(x):
                return self.mlp(x.float())
        return self.mlp(x)

    def prototypes(self, z: torch.Tensor) -> torch.Tensor:
        """Bottleneck ``[M, bottleneck_dim]`` -> logits ``[M, out_dim]`` (L2 normalise, prototypes layer)."""
        if self.fp32 == "off":
            return self.last_layer(F.normalize(z, dim=-1, p=2))
        with _fp32(z):
            return self.last_layer(F.normalize(z.float(), dim=-1, p=2))

    @property
    def g(self) -> torch.Tensor:
        """The prototypes layer's weight-norm magnitudes ``g [out_dim, 1]`` (every logit lies in ``[-g_c, g_c]``)."""
        return self.last_layer.parametrizations.weight.original0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, in_dim]`` (any float dtype) -> logits ``[M, out_dim]``, fp32 unless ``fp32="off"``."""
        return self.prototypes(self.bottleneck(x))


class ProjectionHead(nn.Module):
    """NeCo's projection head (:mod:`wtours.stages.neco.module`): ``nlayers`` linear layers ``D -> hidden -> ... -> out`` with GELU between (no norm)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, nlayers: int = 3) -> None:
        super().__init__()
        self.mlp = gelu_mlp([in_dim] + [hidden_dim] * (nlayers - 1) + [out_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TimeTHead(nn.Module):
    """TimeT's head (:mod:`wtours.objectives.timet`): projection MLP ``D -> 1024 -> 1024 -> 512 -> E`` (GELU between layers, no norm) and ``K``
    unit-norm prototypes ``[K, E]`` (timet.md §1.1).

    Example::

        head = TimeTHead(384)                 # 200 prototypes of width 256
        s = head.scores(tokens)               # tokens [..., 384] -> cosines [..., 200]
        ...; optimizer.step(); head.renormalize_()
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (1024, 1024, 512), out_dim: int = 256,
                 prototypes: int = 200) -> None:
        super().__init__()
        self.mlp = gelu_mlp([in_dim, *hidden, out_dim])
        self.prototypes = nn.Parameter(F.normalize(torch.randn(prototypes, out_dim), dim=-1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> L2-normalised head vectors ``[..., E]``."""
        return F.normalize(self.mlp(tokens), dim=-1)

    def scores(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` -> cosine to every prototype ``[..., K]`` (fp32)."""
        z = self(tokens).float()
        return z @ self.prototypes.float().t()

    @torch.no_grad()
    def renormalize_(self) -> None:
        """Prototypes back to unit rows (after every optimizer step, as the reference)."""
        self.prototypes.copy_(F.normalize(self.prototypes, dim=-1))
