"""Axis-aligned boxes ``[..., 4]`` as ``(x0, y0, x1, y1)``: what NeCo's crop sampler and its loss share."""

from __future__ import annotations

import torch


def box_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection boxes of ``a`` and ``b [..., 4]`` (broadcast); empty ones have x1 <= x0 or y1 <= y0."""
    return torch.cat([torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])], dim=-1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    """Area of boxes ``[..., 4]`` (0 for empty ones)."""
    return (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)
