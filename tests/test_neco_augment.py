"""NeCo multi-crop: box geometry, the overlap constraint and its fallback, views, determinism."""

from __future__ import annotations

import pytest
import torch

from wtours.config import load_config
from wtours.errors import ConfigError
from wtours.stages.neco.crops import NeCoAugment, box_area, box_intersection, overlap_feasibility, sample_neco_boxes
from wtours.stages.neco.config import NeCoConfig, NeCoCropsConfig


def test_boxes_respect_bounds_scales_and_the_overlap_constraint():
    cfg = NeCoCropsConfig()
    sizes = torch.tensor([[300, 400], [400, 300], [120, 500], [64, 64]] * 64)
    boxes, fallback = sample_neco_boxes(torch.Generator().manual_seed(0), sizes, cfg)
    assert boxes.shape == (256, 6, 4) and fallback.shape == (256, 6)
    h, w = sizes[:, 0, None].double(), sizes[:, 1, None].double()
    eps = 1e-6
    assert bool((boxes[..., 0] >= -eps).all() and (boxes[..., 1] >= -eps).all())
    assert bool((boxes[..., 2] <= w + eps).all() and (boxes[..., 3] <= h + eps).all())
    area = box_area(boxes) / (h * w)
    ok = ~fallback
    assert bool(((area[:, :2] >= 0.25 - 1e-6) & (area[:, :2] <= 1 + 1e-6))[ok[:, :2]].all())
    assert bool(((area[:, 2:] >= 0.05 - 1e-6) & (area[:, 2:] <= 0.25 + 1e-6))[ok[:, 2:]].all())
    img = (h * w).squeeze(1)
    g01 = box_area(box_intersection(boxes[:, 0], boxes[:, 1])) / img
    assert bool((g01[ok[:, 1]] > 0.02).all())
    for g in (0, 1):
        inter = box_area(box_intersection(boxes[:, 2:], boxes[:, g:g + 1])) / img[:, None]
        assert bool((inter[ok[:, 2:]] > 0.01).all())
    usual = (sizes.max(dim=1).values / sizes.min(dim=1).values) <= 4 / 3  # panoramas fall back like torchvision
    assert float(fallback[usual].float().mean()) < 0.02  # the defaults are easy to satisfy
    # the fallback still produces boxes inside the image that overlap the globals
    hard = NeCoCropsConfig(min_overlap=0.2, local_scale=(0.05, 0.22), max_tries=5)
    boxes, fallback = sample_neco_boxes(torch.Generator().manual_seed(1), sizes, hard)
    assert float(fallback[:, 2:].float().mean()) > 0.3
    fb = fallback[:, 2:]
    inter = box_area(box_intersection(boxes[:, 2:], boxes[:, :1]))
    assert bool((inter[fb] > 0).all())
    assert bool((boxes[..., 2] <= w + eps).all() and (boxes[..., 0] >= -eps).all())


def test_impossible_overlap_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"crops\.min_overlap: 0\.3 cannot be met"):
        load_config(NeCoConfig, None, ["crops.min_overlap=0.3"])
    with pytest.raises(ConfigError, match=r"crops\.min_overlap_globals"):
        load_config(NeCoConfig, None, ["crops.min_overlap_globals=0.5", "crops.global_scale=[0.1, 0.4]"])
    hard = NeCoCropsConfig(min_overlap=0.2, local_scale=(0.05, 0.205))  # possible in principle, rarely met
    assert overlap_feasibility(hard, 300, 400) > 0.5
    assert overlap_feasibility(NeCoCropsConfig(), 300, 400) < 0.02


def _gradient_images(b, h, w):
    x = torch.linspace(0, 255, w).round().to(torch.uint8)
    return x.view(1, 1, 1, w).expand(b, 3, h, w).contiguous()


def test_views_shapes_no_flips_and_determinism():
    cfg = NeCoCropsConfig(global_size=32, local_size=16, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    images = _gradient_images(3, 60, 80)
    sizes = torch.tensor([[60, 80], [50, 70], [60, 40]])
    aug = NeCoAugment(cfg, seed=5)
    state = aug.state_dict()
    v = aug(images, sizes)
    assert v.global_views.shape == (3, 2, 3, 32, 32) and v.local_views.shape == (3, 4, 3, 16, 16)
    assert v.boxes.shape == (3, 6, 4) and v.fallback.dtype == torch.bool
    assert bool((v.boxes[:, :, 2] <= sizes[:, 1, None] + 1e-4).all())  # inside each image's own valid size
    # no flips: intensity increases left to right in every crop
    for views in (v.global_views, v.local_views):
        cols = views[..., 0, :, :].mean(dim=-2)  # [B, V, W]
        assert bool((cols[..., -1] > cols[..., 0]).all())
    aug.load_state_dict(state)
    again = aug(images, sizes)
    assert torch.equal(again.global_views, v.global_views) and torch.equal(again.boxes, v.boxes)
    other = NeCoAugment(cfg, seed=6)(images, sizes)
    assert not torch.equal(other.boxes, v.boxes)


def test_photometric_jitter_is_per_crop():
    cfg = NeCoCropsConfig(global_size=16, local_size=8, jitter_p=1.0, grayscale_p=0.0, blur_p=0.0)
    images = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    v = NeCoAugment(cfg, seed=0)(images, torch.tensor([[32, 32]] * 2))
    means = torch.cat([v.global_views.flatten(0, 1).mean(dim=(1, 2, 3)), v.local_views.flatten(0, 1).mean(dim=(1, 2, 3))])
    assert len(set(means.round(decimals=4).tolist())) == means.numel()  # every crop jittered differently
