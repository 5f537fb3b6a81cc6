"""NeCo loss: ROI alignment of crop pairs, references, the entropy minimum, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wtours.objectives.neco import NeCoLoss, align_pairs, crop_pairs, pair_boxes


def _pool(img, patch):
    """``[M, C, S, S]`` -> patch features ``[M, C, S/p, S/p]`` (a stand-in for a ViT: mean over each patch)."""
    return F.avg_pool2d(img, patch)


def test_pair_layout_and_box_mapping():
    g, v = crop_pairs(2, 6)
    assert g.tolist() == [0] * 5 + [1] * 5 and v.tolist() == [1, 2, 3, 4, 5, 0, 2, 3, 4, 5]
    boxes = torch.tensor([[[0.0, 0, 100, 100], [50, 20, 150, 120]]])  # two 100 px crops, output 200 px, patch 20
    in_g, in_v, area = pair_boxes(boxes, torch.tensor([200, 200]), *crop_pairs(2, 2), patch=20)
    # overlap (50, 20, 100, 100) in crop 0: (x - 0) * 2 / 20 ; in crop 1: (x - 50) * 2 / 20, (y - 20) * 2 / 20
    assert torch.allclose(in_g[0, 0], torch.tensor([5.0, 2, 10, 10]))
    assert torch.allclose(in_v[0, 0], torch.tensor([0.0, 0, 5, 8]))
    assert torch.allclose(in_g[0, 1], in_v[0, 0]) and torch.allclose(in_v[0, 1], in_g[0, 0])
    assert float(area[0, 0]) == 50 * 80


def test_a_shifted_pattern_aligns_patch_for_patch():
    # two 48 px crops (patch 8: 6 x 6 cells) shifted by (2, 2) patches overlap in 4 x 4 cells; with a 4 x 4
    # ROI every bin samples one cell centre, so the aligned cells must be equal exactly
    patch, side = 8, 48
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 96, 120, generator=g)
    boxes = torch.tensor([[[8.0, 16, 8 + side, 16 + side], [24, 32, 24 + side, 32 + side]]])
    crops = torch.cat([image[..., 16:16 + side, 8:8 + side], image[..., 32:32 + side, 24:24 + side]])
    maps = _pool(crops, patch).unsqueeze(0)  # [1, 2, 3, 6, 6]: the same pattern, shifted by (2, 2) cells
    none = maps.new_zeros(1, 0, 3, 1, 1)
    t, s, area = align_pairs(maps, maps, none, boxes, side, side, patch, roi=4)
    assert t.shape == (1, 2, 16, 3) and bool((area > 0).all())
    assert torch.allclose(t, s, atol=1e-6)  # teacher crop g and student crop v see the same patches
    want = F.normalize(maps[0, 0, :, 2:, 2:].flatten(1).T, dim=-1)  # crop 0's cells (2..5, 2..5)
    assert torch.allclose(t[0, 0], want, atol=1e-6)
    # a wrong box (off by one patch) breaks the correspondence
    wrong = boxes.clone()
    wrong[0, 1, [0, 2]] += patch
    t2, s2, _ = align_pairs(maps, maps, none, wrong, side, side, patch, roi=4)
    assert float((t2 - s2).abs().max()) > 0.05


def test_augmented_crops_of_a_coordinate_image_align():
    """Any crops from NeCoAugment: ROI-aligned teacher and student cells cover the same image positions."""
    from wtours.stages.video.augment import denormalize
    from wtours.stages.neco.crops import NeCoAugment
    from wtours.stages.neco.config import NeCoCropsConfig

    h, w = 96, 128
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    coord = torch.stack([xs / w, ys / h, torch.ones(h, w)])  # channels: x, y, 1
    images = (coord * 255).round().to(torch.uint8).unsqueeze(0).repeat(4, 1, 1, 1)
    cfg = NeCoCropsConfig(global_size=64, local_size=32, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    views = NeCoAugment(cfg, seed=3)(images, torch.tensor([[h, w]] * 4))
    gm = _pool(denormalize(views.global_views.flatten(0, 1)), 8).unflatten(0, (4, 2))
    lm = _pool(denormalize(views.local_views.flatten(0, 1)), 8).unflatten(0, (4, 4))
    t, s, area = align_pairs(gm, gm, lm, views.boxes, 64, 32, 8, roi=4)
    assert bool((area > 0).all())

    def xy(v):  # L2-normalised (x, y, 1) -> (x, y) in image fractions
        return v[..., :2] / v[..., 2:]

    err = (xy(t) - xy(s)).abs()
    assert float(err.max()) < 0.05  # within ~half a patch of the coarser crop (interpolation at the edges)
    assert float(err.mean()) < 0.005
    # student boxes of the local crops off by one local patch to the right: clearly worse
    off = views.boxes.clone()
    off[:, 2:, [0, 2]] += (off[:, 2:, 2:3] - off[:, 2:, 0:1]) / 4
    _, s_off, _ = align_pairs(gm, gm, lm, off, 64, 32, 8, roi=4)
    local = crop_pairs(2, 6)[1] >= 2
    assert float((xy(t) - xy(s_off))[:, local, :, 0].abs().mean()) > 3 * float(err.mean())
    # student crops shuffled between images: the same check fails
    _, s_bad, _ = align_pairs(gm, gm.roll(1, 0), lm.roll(1, 0), views.boxes, 64, 32, 8, roi=4)
    assert float((xy(t) - xy(s_bad)).abs().mean()) > 0.05


def _maps(b, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, 2, c, h, w, generator=g), dim=2)


@pytest.mark.parametrize("references", ["queue", "batch"])
@pytest.mark.parametrize("sorter", ["bitonic", "odd_even"])
def test_student_equal_teacher_gives_the_teacher_entropy_and_perturbations_raise_it(references, sorter):
    b, c = 3, 16
    t_maps = _maps(b, c, 6, 6, 0)[:, :1].repeat(1, 2, 1, 1, 1)  # both globals: the same view, the same features
    same = torch.tensor([[0.0, 0, 48, 48], [0.0, 0, 48, 48]]).expand(b, 2, 4)
    none = t_maps.new_zeros(b, 0, c, 1, 1)
    loss_fn = NeCoLoss(dim=c, sorter=sorter, references=references, queue_length=256, roi=4, seed=0)
    loss_fn.generator.manual_seed(1)
    loss, stats = loss_fn(t_maps, t_maps.clone(), none, same, 48, 48, 8)
    assert float(stats["pairs_valid"]) == 1.0
    assert loss.item() == pytest.approx(stats["teacher_entropy"].item(), abs=1e-5)
    assert abs(stats["kl"].item()) < 1e-5
    for seed in (1, 2, 3):  # any other student costs more (cross-entropy >= entropy)
        noisy = F.normalize(t_maps + 0.3 * _maps(b, c, 6, 6, seed)[:, :1], dim=2)
        loss_fn.generator.manual_seed(1)
        loss_fn.load_counters({"ptr": [0, 0], "filled": [0, 0]})
        worse, st = loss_fn(t_maps, noisy, none, same, 48, 48, 8)
        assert worse.item() > loss.item() + 1e-3
        assert st["teacher_entropy"].item() == pytest.approx(stats["teacher_entropy"].item(), abs=1e-5)


def test_gradients_reach_the_student_maps_only():
    b, c = 2, 8
    t_maps = _maps(b, c, 4, 4, 0).requires_grad_(True)
    s_global = _maps(b, c, 4, 4, 1).requires_grad_(True)
    s_local = F.normalize(torch.randn(b, 4, c, 2, 2), dim=2).requires_grad_(True)
    boxes = torch.tensor([[0.0, 0, 64, 64], [16, 16, 80, 80], [10, 10, 40, 40], [30, 30, 60, 60],
                          [20, 40, 50, 70], [40, 20, 70, 50]]).expand(b, 6, 4)
    loss, _ = NeCoLoss(dim=c, roi=3, queue_length=64)(t_maps, s_global, s_local, boxes, 32, 16, 8)
    loss.backward()
    assert t_maps.grad is None
    for p in (s_global, s_local):
        assert bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().max()) > 0


def test_queue_counters_per_crop_and_references_only_from_filled_entries():
    c = 8
    loss_fn = NeCoLoss(dim=c, roi=2, queue_length=32, queue_push_per_image=3)
    t_maps = _maps(2, c, 2, 2, 0)
    loss_fn.push(t_maps)
    assert loss_fn.filled == [6, 6] and loss_fn.ptr == [6, 6]  # one counter per queue (the reference shares one)
    refs = loss_fn.draw_references(torch.zeros(2, 10, 4, c), crop_pairs(2, 6)[0])
    assert bool((refs.norm(dim=-1) > 0.99).all())  # no empty slot is ever drawn
    pushed = torch.cat([t_maps[:, g].flatten(2).transpose(1, 2).reshape(-1, c) for g in range(2)])
    dist = torch.cdist(refs.reshape(-1, c), pushed).min(dim=1).values
    assert float(dist.max()) < 2e-3  # every reference is a pushed teacher patch (cdist rounding)
    for _ in range(10):
        loss_fn.push(t_maps)
    assert loss_fn.filled == [32, 32] and loss_fn.ptr == [(6 * 11) % 32] * 2


def test_torchsort_sorter_is_zero_at_the_teacher():
    from wtours.objectives.sorting import torchsort_problem

    if torchsort_problem("cpu"):
        pytest.skip(f"torchsort unavailable: {torchsort_problem('cpu')}")
    t_maps = _maps(2, 8, 4, 4, 0)[:, :1].repeat(1, 2, 1, 1, 1)
    same = torch.tensor([[0.0, 0, 32, 32], [0.0, 0, 32, 32]]).expand(2, 2, 4)
    none = t_maps.new_zeros(2, 0, 8, 1, 1)
    fn = NeCoLoss(dim=8, sorter="torchsort", roi=3, queue_length=64)
    loss, stats = fn(t_maps, t_maps, none, same, 32, 32, 8)
    assert loss.item() < 1e-10 and "rank_mse" in stats
    loss2, _ = fn(t_maps, _maps(2, 8, 4, 4, 5), none, same, 32, 32, 8)
    assert loss2.item() > 1e-4
