"""Augmentation primitives both stages share (stage 1's clip multi-crop, :mod:`wtours.stages.video.augment`;
NeCo's image multi-crop, :mod:`wtours.stages.neco.crops`): crop boxes in source pixels and one anti-aliased
``roi_align`` resample per output size, the photometric ops (kornia's functional ops with per-image parameter
tensors, torchvision ``ColorJitter`` semantics), ImageNet normalisation, and :class:`SeededAugment` (the seeded
CPU generator every random parameter comes from, carried through checkpoints for exact resume).

No Python loop over frames, crops or images, no host sync; the parameters are drawn on the CPU, so a seed gives
the same views on CPU and GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import kornia as K
import torch
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- geometry


def max_fitting_scale(aspect: float, ratio: tuple[float, float]) -> float:
    """The largest area fraction of a canvas of ``aspect`` (W/H) that a box with an aspect in ``ratio`` can
    cover: 1 when ``aspect`` lies in ``ratio``, else ``ratio[1] / aspect`` (canvas wider) or ``aspect /
    ratio[0]`` (canvas taller). A box of area fraction ``s`` and aspect ``r`` fits iff ``s <= min(aspect / r,
    r / aspect)``."""
    if aspect > ratio[1]:
        return ratio[1] / aspect
    if aspect < ratio[0]:
        return aspect / ratio[0]
    return 1.0


def crop_fit_problem(name: str, scale: tuple[float, float], ratio: tuple[float, float], height: float,
                     width: float) -> str | None:
    """One line when no box of area fraction ``scale[0]`` (the smallest asked) with an aspect in ``ratio`` fits
    a ``height x width`` canvas: then torchvision's rule would fall back to one and the same centre box for
    every draw. None when boxes fit."""
    top = max_fitting_scale(width / height, ratio)
    if scale[0] <= top + 1e-9:
        return None
    return (f"{name}: boxes of at least {scale[0]:g} of a {width:.0f}x{height:.0f} canvas with aspect "
            f"{ratio[0]:.3g}-{ratio[1]:.3g} never fit it (at most {top:.3g} does), so every crop would be the same "
            f"centre box; lower {name} to <= {top:.3g} or widen crops.ratio")


def sample_resized_crop_boxes(gen: torch.Generator, n: int, height: float, width: float,
                              scale: tuple[float, float], ratio: tuple[float, float],
                              attempts: int = 10) -> torch.Tensor:
    """``n`` RandomResizedCrop boxes ``[n, 4]`` (x0, y0, x1, y1; float pixels) in a ``height x width`` canvas.

    torchvision's rule, vectorised: up to ``attempts`` candidates (area fraction ~ U(scale),
    log aspect ~ U(log ratio)); the first that fits is used, else a centre crop with the aspect
    clamped to ``ratio``. A fixed number of random draws is made per call (reproducible).
    Raises ValueError when no box of the smallest ``scale`` can fit (:func:`crop_fit_problem`): the
    fallback would then be the only box ever drawn.
    """
    problem = crop_fit_problem("scale", scale, ratio, height, width)
    if problem is not None:
        raise ValueError(problem)
    area = height * width
    u = torch.rand(n, attempts, 4, generator=gen, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    ar = torch.exp(log_r)
    w = torch.sqrt(target * ar)
    h = torch.sqrt(target / ar)
    ok = (w <= width) & (h <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1)  # first fitting attempt (0 if none)
    rows = torch.arange(n)
    w, h, ux, uy = w[rows, first], h[rows, first], u[rows, first, 2], u[rows, first, 3]
    any_ok = ok.any(dim=1)
    # fallback: centre crop, aspect clamped into ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = height * ratio[1], height
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    ux = torch.where(any_ok, ux, torch.full_like(ux, 0.5))
    uy = torch.where(any_ok, uy, torch.full_like(uy, 0.5))
    x0 = ux * (width - w)
    y0 = uy * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1).float()


def compose_boxes(outer: torch.Tensor, inner: torch.Tensor, canvas: float) -> torch.Tensor:
    """Map ``inner`` boxes ``[..., 4]`` given in a ``canvas x canvas`` resize of the ``outer``
    boxes ``[..., 4]`` (broadcastable) back to the outer boxes' coordinates."""
    ox0, oy0, ox1, oy1 = outer.unbind(-1)
    sx = (ox1 - ox0) / canvas
    sy = (oy1 - oy0) / canvas
    ix0, iy0, ix1, iy1 = inner.unbind(-1)
    return torch.stack([ox0 + ix0 * sx, oy0 + iy0 * sy, ox0 + ix1 * sx, oy0 + iy1 * sy], dim=-1)


def crop_resize(frames: torch.Tensor, boxes: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """Cut ``boxes [M, 4]`` out of ``frames [F, C, H, W]`` (frame ``index [M]``) -> ``[M, C, size, size]``.

    One ``roi_align(aligned=True)`` call; uint8 frames are read as float (values unchanged).
    """
    if not frames.is_floating_point():
        frames = frames.float()
    rois = torch.cat([index.to(frames.dtype)[:, None], boxes.to(frames.dtype)], dim=1)
    return roi_align(frames, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# ----------------------------------------------------------------------------- photometric


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] -> ``[N, 1, H, W]`` (ITU-R 601 luma, as torchvision; ``kornia.color``)."""
    return K.color.rgb_to_grayscale(x)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift [N]`` turns (-0.5..0.5), torchvision semantics; ``x [N, 3, H, W]`` in [0, 1]
    (``kornia.enhance.adjust_hue``, which takes radians)."""
    return K.enhance.adjust_hue(x, shift.to(x.dtype) * (2.0 * math.pi)).clamp_(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Gaussian blur with one ``sigma [N]`` per image of ``x [N, C, H, W]`` (reflect padding;
    ``kornia.filters.gaussian_blur2d``, separable). The kernel spans ``+-3 max_sigma`` (capped by the image
    size) for every image, so one call serves the batch."""
    _, _, hh, ww = x.shape
    radius = max(1, min(math.ceil(3.0 * max_sigma), hh - 1, ww - 1))
    sig = sigma.to(x.device, x.dtype).view(-1, 1).expand(-1, 2)
    return K.filters.gaussian_blur2d(x, (2 * radius + 1, 2 * radius + 1), sig, border_type="reflect")


@dataclass
class PhotometricParams:
    """Per-image photometric parameters (CPU tensors, moved to the images' device on use)."""

    order: torch.Tensor  # [N, 4] permutation of (brightness, contrast, saturation, hue)
    brightness: torch.Tensor  # [N] factor (1 = identity)
    contrast: torch.Tensor  # [N]
    saturation: torch.Tensor  # [N]
    hue: torch.Tensor  # [N] shift in turns (0 = identity)
    gray: torch.Tensor  # [N] bool
    blur: torch.Tensor  # [N] bool
    sigma: torch.Tensor  # [N]

    def to(self, device: torch.device) -> "PhotometricParams":
        return PhotometricParams(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})

    def expand(self, index: torch.Tensor) -> "PhotometricParams":
        """Select rows (e.g. share a clip's parameters over its frames)."""
        return PhotometricParams(**{k: v[index] for k, v in vars(self).items()})


def sample_photometric(gen: torch.Generator, n: int, jitter_p: float, brightness: float, contrast: float,
                       saturation: float, hue: float, grayscale_p: float, blur_p: float,
                       blur_sigma: tuple[float, float]) -> PhotometricParams:
    """Draw ``n`` images' photometric parameters (fixed number of draws per call)."""
    u = torch.rand(n, 9, generator=gen)
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)
    jit = u[:, 0] < jitter_p
    one = torch.ones(n)

    def factor(col: int, amount: float) -> torch.Tensor:
        f = 1.0 - amount + 2.0 * amount * u[:, col]
        return torch.where(jit, f.clamp_min(0.0), one)

    hue_shift = torch.where(jit, (2.0 * u[:, 4] - 1.0) * hue, torch.zeros(n))
    sigma = blur_sigma[0] + (blur_sigma[1] - blur_sigma[0]) * u[:, 7]
    return PhotometricParams(order=order, brightness=factor(1, brightness), contrast=factor(2, contrast),
                             saturation=factor(3, saturation), hue=hue_shift, gray=u[:, 5] < grayscale_p,
                             blur=u[:, 6] < blur_p, sigma=sigma)


def one_jitter_op(p: PhotometricParams) -> PhotometricParams:
    """Keep only the colour-jitter op in the last slot of each image's random order (the others -> identity).

    TimeT's reference ``ColorJitter`` applies each of its four ops to the *original* image, so only the last
    one applied survives (timet.md §1.2): ``crops.jitter_ops: one`` reproduces that with the same draws."""
    last = p.order[:, 3]
    one, zero = torch.ones_like(p.brightness), torch.zeros_like(p.hue)
    return PhotometricParams(order=p.order, brightness=torch.where(last == 0, p.brightness, one),
                             contrast=torch.where(last == 1, p.contrast, one),
                             saturation=torch.where(last == 2, p.saturation, one),
                             hue=torch.where(last == 3, p.hue, zero), gray=p.gray, blur=p.blur, sigma=p.sigma)


def apply_photometric(x: torch.Tensor, p: PhotometricParams, max_sigma: float) -> torch.Tensor:
    """Jitter (random order per image), grayscale, blur on ``x [N, 3, H, W]`` in [0, 1], with kornia's
    functional ops and per-image parameter tensors (torchvision's ``ColorJitter`` semantics:
    ``adjust_brightness_accumulative`` = multiply, ``adjust_contrast_with_mean_subtraction`` = blend with the
    grey mean, ``adjust_saturation_with_gray_subtraction`` = blend with the grey image, ``adjust_hue``).

    Each of the 4 jitter slots applies brightness, contrast and saturation to all images, with the
    image's factor where its permutation puts that op in that slot and the identity factor
    elsewhere (batched, no per-image branching). The hue rotation (RGB -> HSV -> RGB, ~3/4 of the
    cost when it ran in every slot for every image) runs once per image, in its slot, and only for
    images whose shift is not 0 (no jitter drawn: left alone, as torchvision's ``RandomApply`` leaves
    them): the images of a slot are picked with indices computed from ``p`` on the CPU (the parameters
    are drawn there), so there is no host sync.
    """
    dev = x.device
    order, hue = p.order.cpu(), p.hue.cpu()  # no-ops for the CPU-drawn parameters of ClipAugment
    p = p.to(dev)
    ident = torch.ones_like(p.brightness, dtype=x.dtype)
    for slot in range(4):
        op = p.order[:, slot]
        x = K.enhance.adjust_brightness_accumulative(x, torch.where(op == 0, p.brightness.to(x.dtype), ident))
        x = K.enhance.adjust_contrast_with_mean_subtraction(x, torch.where(op == 1, p.contrast.to(x.dtype), ident))
        x = K.enhance.adjust_saturation_with_gray_subtraction(x, torch.where(op == 2, p.saturation.to(x.dtype), ident))
        sel = torch.nonzero((order[:, slot] == 3) & (hue != 0)).flatten()
        if sel.numel():
            idx = sel.to(dev, non_blocking=True)
            x = x.index_copy(0, idx, adjust_hue(x.index_select(0, idx), p.hue.index_select(0, idx)))
    x = torch.where(p.gray.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
    x = torch.where(p.blur.view(-1, 1, 1, 1), gaussian_blur(x, p.sigma, max_sigma), x)
    return x


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of ``[..., 3, H, W]`` in [0, 1]."""
    mean = x.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1]."""
    mean = x.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- seeded augmenters


class SeededAugment:
    """An augmenter's config ``cfg`` and the seeded CPU ``generator`` all its random parameters come
    from; ``state_dict`` / ``load_state_dict`` carry the generator through checkpoints."""

    def __init__(self, cfg: Any, seed: int = 0) -> None:
        self.cfg = cfg
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
