"""wtours.stages.video.augment: batched multi-crop of uint8 clips (shared clip geometry, per-frame local crops)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from wtours.stages.video.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClipAugment,
    adjust_hue,
    compose_boxes,
    crop_resize,
    denormalize,
    gaussian_blur,
    sample_resized_crop_boxes,
)
from wtours.stages.video.config import CropsConfig

SMALL = dict(precrop_size=60, global_size=32, local_size=16, local_number=3)
NO_PHOTO = dict(jitter_p=0.0, grayscale_p=0.0, blur_global_p=0.0, blur_local_p=0.0)


def clips(b=2, t=3, h=72, w=128, seed=0, static=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 1 if static else t, 3, h, w), generator=g, dtype=torch.uint8)
    return x.expand(b, t, 3, h, w).contiguous() if static else x


def test_shapes_ranges_and_normalisation():
    aug = ClipAugment(CropsConfig(**SMALL), seed=0)
    v = aug(clips())
    assert v.global_views.shape == (2, 3, 3, 32, 32) and v.global_views.dtype == torch.float32
    assert v.local_views.shape == (2, 3, 3, 3, 16, 16)
    assert v.global_boxes.shape == (2, 4) and v.local_boxes.shape == (2, 3, 3, 4)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for x in (v.global_views, v.local_views):
        assert torch.isfinite(x).all()
        assert (x >= (0 - mean) / std - 1e-5).all() and (x <= (1 - mean) / std + 1e-5).all()
        d = denormalize(x)
        assert d.min() >= 0 and d.max() <= 1
    # boxes lie inside the 128x72 frame
    for bx in (v.global_boxes, v.local_boxes.reshape(-1, 4)):
        assert (bx[:, 0] >= -1e-4).all() and (bx[:, 1] >= -1e-4).all()
        assert (bx[:, 2] <= 128 + 1e-3).all() and (bx[:, 3] <= 72 + 1e-3).all()
        assert (bx[:, 2] > bx[:, 0]).all() and (bx[:, 3] > bx[:, 1]).all()


def test_same_seed_same_views_other_seed_other_views():
    x = clips()
    a = ClipAugment(CropsConfig(**SMALL), seed=3)(x)
    b = ClipAugment(CropsConfig(**SMALL), seed=3)(x)
    c = ClipAugment(CropsConfig(**SMALL), seed=4)(x)
    assert torch.equal(a.global_views, b.global_views) and torch.equal(a.local_views, b.local_views)
    assert not torch.allclose(a.global_views, c.global_views)
    aug = ClipAugment(CropsConfig(**SMALL), seed=3)
    state = aug.state_dict()
    first = aug(x)
    aug.load_state_dict(state)
    assert torch.equal(aug(x).local_views, first.local_views)


def test_static_clip_global_geometry_shared_local_crops_per_frame():
    aug = ClipAugment(CropsConfig(**SMALL, **NO_PHOTO), seed=0)
    v = aug(clips(b=2, t=4, static=True))
    g = v.global_views
    assert torch.equal(g[:, 1:], g[:, :1].expand_as(g[:, 1:]))  # every frame: same crop, same flip
    lb = v.local_boxes  # [B, T, V, 4]
    assert not torch.allclose(lb[:, 0], lb[:, 1])  # local crops are drawn per frame
    assert not torch.allclose(v.local_views[:, 0], v.local_views[:, 1])
    # per-frame photometrics break the equality, clip-level ones keep it
    per_frame = ClipAugment(CropsConfig(**SMALL, jitter_p=1.0), seed=0)(clips(t=4, static=True)).global_views
    assert not torch.allclose(per_frame[:, 0], per_frame[:, 1])
    per_clip = ClipAugment(CropsConfig(**SMALL, jitter_p=1.0, blur_global_p=1.0, photometric="clip"), seed=0)
    gc = per_clip(clips(t=4, static=True)).global_views
    assert torch.allclose(gc[:, 1:], gc[:, :1].expand_as(gc[:, 1:]), atol=1e-5)


def test_flip_is_a_mirror_of_the_same_crop():
    x = clips()
    base = ClipAugment(CropsConfig(**SMALL, **NO_PHOTO, flip_p=0.0), seed=1)(x)
    flipped = ClipAugment(CropsConfig(**SMALL, **NO_PHOTO, flip_p=1.0), seed=1)(x)
    assert torch.allclose(flipped.global_views, base.global_views.flip(-1))
    assert torch.equal(flipped.local_views, base.local_views)  # no flip on local crops (reference)


def test_crop_resize_reads_the_box():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    full = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    out = crop_resize(img, full, torch.tensor([1, 0]), 8)
    assert torch.allclose(out[0], img[1]) and torch.allclose(out[1], img[0])
    quarter = crop_resize(img.to(torch.uint8), torch.tensor([[4.0, 0.0, 8.0, 4.0]]), torch.tensor([0]), 4)
    assert torch.allclose(quarter[0], img[0, :, 0:4, 4:8].to(torch.uint8).float())


def test_resized_crop_boxes_respect_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    b = sample_resized_crop_boxes(g, 2000, 300.0, 300.0, (0.05, 0.4), (3 / 4, 4 / 3))
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    frac = w * h / 300.0 ** 2
    assert frac.min() >= 0.05 - 1e-4 and frac.max() <= 0.4 + 1e-4
    assert (w / h).min() >= 3 / 4 - 1e-4 and (w / h).max() <= 4 / 3 + 1e-4
    assert frac.std() > 0.05  # really random
    outer = torch.tensor([[10.0, 20.0, 110.0, 70.0]])
    assert torch.allclose(compose_boxes(outer, torch.tensor([[0.0, 0.0, 300.0, 300.0]]), 300.0), outer)
    assert torch.allclose(compose_boxes(outer, torch.tensor([[150.0, 150.0, 300.0, 300.0]]), 300.0),
                          torch.tensor([[60.0, 45.0, 110.0, 70.0]]))


def test_photometric_ops_match_torchvision():
    x = torch.rand(4, 3, 10, 12)
    shift = torch.tensor([0.1, -0.1, 0.05, 0.0])
    ref = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(4)])
    assert torch.allclose(adjust_hue(x, shift), ref, atol=1e-5)
    const = torch.full((2, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.5, 2.0]), 2.0), const, atol=1e-6)
    imp = torch.zeros(1, 1, 15, 15)
    imp[0, 0, 7, 7] = 1.0
    blurred = gaussian_blur(imp, torch.tensor([1.0]), 2.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[0, 0, 7, 7] < 0.2 and torch.allclose(blurred[0, 0], blurred[0, 0].T, atol=1e-7)


def test_bad_input_shape_is_rejected():
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        ClipAugment(CropsConfig(**SMALL))(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_views_stay_fp32_inside_autocast():
    aug = ClipAugment(CropsConfig(**SMALL), seed=5)
    x = clips()
    plain = aug(x)
    aug = ClipAugment(CropsConfig(**SMALL), seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = aug(x)
    assert auto.global_views.dtype == torch.float32 and auto.local_views.dtype == torch.float32
    assert torch.equal(auto.global_views, plain.global_views)
