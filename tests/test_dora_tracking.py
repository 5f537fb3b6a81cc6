"""DoRA tracker: head sampling, discovery + tracking maps (vs a per-clip loop oracle), masks."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from wtours.models.vit import TrackingOutput, TrackingViT
from wtours.objectives.dora import (binarise_maps, clip_keys, gather_frame0, mask_views,
                                    masks_to_pixels, sample_heads, track_objects)
from wtours.objectives.sinkhorn import sinkhorn_knopp


def _fake(B=3, T=4, h=3, N=16, dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cls_attn = torch.softmax(torch.randn(B, h, N + 1, generator=g) * 2, -1)[..., 1:]
    t0 = SimpleNamespace(q=torch.randn(B, h, N, dh, generator=g), cls_attn=cls_attn,
                         patches=torch.randn(B, N, h * dh, generator=g))
    keys = torch.randn(B, T, h, N, dh, generator=g)
    return t0, keys


def _oracle(t0, keys, heads, eps=0.05, iters=30):
    """Per clip, per frame, per object transcription of dora.md §3 steps 1-4."""
    B, T, h, N, dh = keys.shape
    D = h * dh
    out = torch.zeros(B, T, heads.shape[1], N)
    for b in range(B):
        A = t0.cls_attn[b, heads[b]]                                   # [k, N]
        Q = t0.q[b].permute(1, 0, 2).reshape(N, D)                     # heads concatenated
        P = A @ Q
        Z = t0.patches[b] / t0.patches[b].norm(dim=-1, keepdim=True)
        M = sinkhorn_knopp(Z @ P.T, eps, iters)
        P2 = M.T @ Z
        for t in range(T):
            K = keys[b, t].permute(1, 0, 2).reshape(N, D)
            for j in range(heads.shape[1]):
                out[b, t, j] = torch.softmax((P2[j] @ K.T) * D ** -0.5, dim=-1)
    return out


def test_sample_heads_distinct_in_range_and_modes():
    g = torch.Generator().manual_seed(0)
    shared = sample_heads(g, 16, 6, 3, "cpu", per_sample=False)
    assert shared.shape == (16, 3) and shared.dtype == torch.long
    assert (shared == shared[:1]).all()
    per = sample_heads(g, 64, 6, 3, "cpu", per_sample=True)
    assert per.shape == (64, 3)
    assert ((per >= 0) & (per < 6)).all()
    assert all(len(set(row.tolist())) == 3 for row in per)          # distinct heads per clip
    assert len({tuple(sorted(r.tolist())) for r in per}) > 5        # clips differ
    a = sample_heads(torch.Generator().manual_seed(5), 4, 6, 3, per_sample=True)
    b = sample_heads(torch.Generator().manual_seed(5), 4, 6, 3, per_sample=True)
    assert torch.equal(a, b)
    counts = torch.bincount(sample_heads(g, 3000, 6, 3, per_sample=True).flatten(), minlength=6)
    assert (counts > 1300).all()                                    # ~uniform: 1500 each
    with pytest.raises(ValueError):
        sample_heads(None, 2, 6, 7, "cpu")


@pytest.mark.parametrize("per_sample", [False, True])
def test_track_objects_equals_loop_oracle(per_sample):
    t0, keys = _fake()
    heads = sample_heads(torch.Generator().manual_seed(1), 3, 3, 2, per_sample=per_sample)
    maps = track_objects(t0, keys, heads)
    assert maps.shape == (3, 4, 2, 16) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, _oracle(t0, keys, heads), atol=1e-5, rtol=1e-4)


def test_each_map_is_a_distribution_and_static_frames_give_equal_maps():
    t0, keys = _fake(B=2, T=3)
    keys = keys[:, :1].expand(-1, 3, -1, -1, -1)                    # the scene does not change
    maps = track_objects(t0, keys, torch.tensor([[0, 2], [1, 2]]))
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, 2))
    torch.testing.assert_close(maps[:, 1], maps[:, 0])
    torch.testing.assert_close(maps[:, 2], maps[:, 0])
    with pytest.raises(ValueError):
        track_objects(t0, keys[:, :, :, :5], torch.tensor([[0, 1], [1, 2]]))


def test_track_objects_fp32_under_autocast_with_bf16_inputs():
    t0, keys = _fake()
    heads = torch.tensor([[0, 1, 2]] * 3)
    ref = track_objects(t0, keys, heads)
    t0b = SimpleNamespace(q=t0.q.bfloat16(), cls_attn=t0.cls_attn, patches=t0.patches.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = track_objects(t0b, keys.bfloat16(), heads)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 4, 3))
    assert (out - ref).abs().max() < 0.2


def test_binarise_batch_threshold_is_the_reference_rule():
    g = torch.Generator().manual_seed(3)
    maps = torch.softmax(torch.randn(4, 3, 2, 49, generator=g) * 2, -1)
    masks = binarise_maps(maps, "batch")
    assert masks.shape == maps.shape and masks.dtype == torch.bool
    for t in range(3):
        for j in range(2):
            m = maps[:, t, j] / maps[:, t, j].norm(dim=-1, keepdim=True)
            assert torch.equal(masks[:, t, j], m > m.mean())
    frac = masks.float().mean()
    assert 0.15 < frac < 0.6                                        # peaked maps: a minority of patches
    sample = binarise_maps(maps, "sample")
    for b in range(4):
        m = maps[b] / maps[b].norm(dim=-1, keepdim=True)
        assert torch.equal(sample[b], m > m.mean(-1, keepdim=True))
    with pytest.raises(ValueError):
        binarise_maps(maps, "frame")


def test_sample_and_batch_thresholds_differ_as_expected():
    N = 16
    flat = torch.full((N,), 1.0 / N) + torch.linspace(-1e-3, 1e-3, N)  # almost uniform map
    peaked = torch.full((N,), 1e-4)
    peaked[3] = 1.0
    maps = torch.stack([flat, peaked]).view(2, 1, 1, N)
    batch, sample = binarise_maps(maps, "batch"), binarise_maps(maps, "sample")
    # batch: the uniform clip is entirely above the batch mean (dragged down by the peaked clip)
    assert batch[0].all() and batch[1].sum() == 1 and batch[1, 0, 0, 3]
    # sample: each clip against its own mean -> the uniform clip keeps only its upper half
    assert sample[0].sum() == N // 2 and sample[1].sum() == 1 and sample[1, 0, 0, 3]


def test_masks_to_pixels_is_nearest_upsampling_and_views_are_masked():
    g = torch.Generator().manual_seed(4)
    masks = torch.rand(2, 3, 2, 12, generator=g) > 0.5               # grid 3 x 4
    pix = masks_to_pixels(masks, (3, 4), 8)
    assert pix.shape == (2, 3, 2, 1, 24, 32) and pix.dtype == torch.float32
    ref = F.interpolate(masks.float().view(12, 1, 3, 4), scale_factor=8, mode="nearest")
    assert torch.equal(pix.view(12, 1, 24, 32), ref)
    assert masks_to_pixels(masks.half(), (3, 4), 8).dtype == torch.float16
    images = torch.randn(2, 3, 3, 24, 32, generator=g)
    views = mask_views(images, masks, 8)
    assert views.shape == (2, 3, 2, 3, 24, 32)
    assert torch.equal(views, images.unsqueeze(2) * pix)
    assert (views[pix.expand_as(views) == 0] == 0).all()
    with pytest.raises(ValueError):
        masks_to_pixels(masks, (3, 3), 8)


def test_end_to_end_with_a_tiny_teacher():
    torch.manual_seed(0)
    B, T, k = 2, 3, 2
    teacher = TrackingViT("vit_tiny_patch16_224", depth=1, embed_dim=24, num_heads=3).eval()
    frames = torch.randn(B, T, 3, 64, 48)
    with torch.no_grad():
        out = teacher.forward_tracking(frames.flatten(0, 1))
    f0 = gather_frame0(out, B, T)
    assert isinstance(f0, TrackingOutput)
    assert f0.q.shape == (B, 3, 12, 8) and f0.patches.shape == (B, 12, 24) and f0.cls_attn.shape == (B, 3, 12)
    torch.testing.assert_close(f0.patches[1], out.patches[T])        # clip-major rows: b*T + t
    keys = clip_keys(out, B, T)
    assert keys.shape == (B, T, 3, 12, 8)
    torch.testing.assert_close(keys[1, 2], out.k[1 * T + 2])
    heads = sample_heads(None, B, teacher.num_heads, k, frames.device, per_sample=True)
    maps = track_objects(f0, keys, heads)
    masks = binarise_maps(maps)
    views = mask_views(frames, masks, teacher.patch_size)
    assert maps.shape == (B, T, k, 12) and views.shape == (B, T, k, 3, 64, 48)
    torch.testing.assert_close(maps.sum(-1), torch.ones(B, T, k))
    assert masks.any(-1).all()                                       # every map keeps some patches


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hot_path_has_no_host_syncs():
    from wtours.models.ema import ema_update_
    from wtours.objectives.dino import DINOLoss
    from wtours.objectives.dora import dora_loss

    dev = torch.device("cuda")
    torch.manual_seed(0)
    B, T, k, V, C = 2, 3, 2, 2, 64
    teacher = TrackingViT("vit_tiny_patch16_224", depth=1, embed_dim=48, num_heads=3).to(dev).eval()
    frames = torch.randn(B, T, 3, 64, 64, device=dev)
    crit = DINOLoss(C).to(dev)
    momentum = torch.tensor(0.99, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = teacher.forward_tracking(frames.flatten(0, 1))
            heads = sample_heads(None, B, teacher.num_heads, k, dev, per_sample=True)
            maps = track_objects(gather_frame0(out, B, T), clip_keys(out, B, T), heads)
            views = mask_views(frames, binarise_maps(maps), teacher.patch_size)
        s_loc = torch.randn(B, T, V, C, device=dev)
        s_msk = torch.randn(B, T, k, C, device=dev)
        tgt = torch.randn(B, T, C, device=dev)
        loss = dora_loss(s_loc, s_msk, tgt, crit.center, compat_reference=False)
        loss_c = dora_loss(s_loc, s_msk, tgt, crit.center, compat_reference=True)
        crit.queue_center(tgt)
        crit.apply_center_update()
        ema_update_(teacher, teacher, momentum)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert views.shape == (B, T, k, 3, 64, 64) and maps.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(loss_c)
