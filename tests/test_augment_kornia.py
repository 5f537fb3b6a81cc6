"""Photometric augmentation through kornia (issue 19) equals the hand-written ops it replaced.

The reference below is wtours' own pre-kornia implementation (batched torchvision ``ColorJitter`` semantics,
written by hand: grey blend, HSV hue rotation, separable blur), kept here verbatim as an oracle. Stated
tolerance: 1e-5 on [0, 1] images (measured: max 2.3e-6, from kornia's HSV conversion; brightness, contrast,
saturation, grey and blur agree to float rounding). No intended difference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wtours.stages.video.augment import adjust_hue, apply_photometric, gaussian_blur, rgb_to_gray, sample_photometric

_GRAY = (0.299, 0.587, 0.114)


def _rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, 1, H, W]`` (ITU-R 601 luma, as torchvision)."""
    w = x.new_tensor(_GRAY).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _blend(x: torch.Tensor, ref: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * ref).clamp_(0.0, 1.0)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift [N]`` turns (-0.5..0.5), torchvision semantics; ``x [N, 3, H, W]`` in [0, 1]."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=x.device).view(1, -1, 1, 1)  # [N, 6, H, W]
    a1 = torch.stack((v, q, p, p, t, v), dim=1)
    a2 = torch.stack((t, v, v, q, p, p), dim=1)
    a3 = torch.stack((p, p, t, v, v, q), dim=1)
    a4 = torch.stack((a1, a2, a3), dim=1)  # [N, 3, 6, H, W]
    return torch.einsum("nchw,nkchw->nkhw", mask.to(x.dtype), a4)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma [N]`` per image of ``x [N, C, H, W]`` (reflect padding).

    The kernel spans ``+-3 max_sigma`` (capped by the image size); one grouped conv per axis.
    """
    n, c, hh, ww = x.shape
    radius = max(1, min(math.ceil(3.0 * max_sigma), hh - 1, ww - 1))
    offs = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (offs[None, :] / sigma.to(x.dtype)[:, None]) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # [N, K]
    k = k.repeat_interleave(c, dim=0)  # [N*C, K]
    y = x.reshape(1, n * c, hh, ww)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, hh, ww)


def _apply_photometric_by_hand(x: torch.Tensor, p: PhotometricParams, max_sigma: float) -> torch.Tensor:
    """The pre-kornia implementation (wtours 0.1, issue 12), kept as the reference."""
    dev = x.device
    order, hue = p.order.cpu(), p.hue.cpu()  # no-ops for the CPU-drawn parameters of ClipAugment
    p = p.to(dev)
    ident = torch.ones_like(p.brightness)
    for slot in range(4):
        op = p.order[:, slot]
        x = _blend(x, torch.zeros_like(x[:, :1]), torch.where(op == 0, p.brightness, ident))
        mean = _rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = _blend(x, mean, torch.where(op == 1, p.contrast, ident))
        x = _blend(x, _rgb_to_gray(x), torch.where(op == 2, p.saturation, ident))
        sel = torch.nonzero((order[:, slot] == 3) & (hue != 0)).flatten()
        if sel.numel():
            idx = sel.to(dev, non_blocking=True)
            x = x.index_copy(0, idx, _adjust_hue(x.index_select(0, idx), p.hue.index_select(0, idx)))
    x = torch.where(p.gray.view(-1, 1, 1, 1), _rgb_to_gray(x).expand_as(x), x)
    x = torch.where(p.blur.view(-1, 1, 1, 1), _gaussian_blur(x, p.sigma, max_sigma), x)
    return x


@pytest.mark.parametrize("seed, size", [(0, 24), (1, 9), (2, 40)])
def test_kornia_photometric_equals_the_hand_written_ops(seed, size):
    gen = torch.Generator().manual_seed(seed)
    n = 128
    p = sample_photometric(gen, n, 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.5, (0.1, 2.0))
    assert p.gray.any() and p.blur.any() and (p.hue != 0).any()
    x = torch.rand(n, 3, size, size, generator=gen)
    got, want = apply_photometric(x, p, 2.0), _apply_photometric_by_hand(x, p, 2.0)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() < 1e-5
    assert not torch.allclose(got, x, atol=1e-2)  # it did change the images


def test_each_kornia_op_equals_its_hand_written_one():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(16, 3, 20, 20, generator=gen)
    shift = torch.rand(16, generator=gen) - 0.5
    sigma = 0.1 + 1.9 * torch.rand(16, generator=gen)
    assert torch.allclose(rgb_to_gray(x), _rgb_to_gray(x), atol=1e-6)
    assert torch.allclose(adjust_hue(x, shift), _adjust_hue(x, shift), atol=1e-5)
    assert torch.allclose(gaussian_blur(x, sigma, 2.0), _gaussian_blur(x, sigma, 2.0), atol=1e-6)
