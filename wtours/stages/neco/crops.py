"""Batched GPU multi-crop for NeCo (``shared/reference/neco.md`` §1.2): 2 global + 4 local crops per image
whose pairwise overlaps are known, so patches can be ROI-aligned across crops.

Input: a batch of uint8 images padded to one canvas ``[B, 3, H, W]`` and each image's valid size
``sizes [B, 2]`` (``h, w``; the loader pads with the edge pixels). Output (:class:`NeCoViews`),
ImageNet-normalised float32:

* ``global_views [B, G, 3, Sg, Sg]`` and ``local_views [B, L, 3, Sl, Sl]``;
* ``boxes [B, G + L, 4]``: every crop's box ``(x0, y0, x1, y1)`` in canvas pixels (globals first);
* ``fallback [B, G + L]``: crops placed by the fallback rule below.

Geometry (torchvision ``RandomResizedCrop`` draws: area fraction ~ U(scale) of the image, log
aspect ~ U(log ratio)), with NeCo's overlap constraint: global crop 1 must intersect global crop 0
by more than ``min_overlap_globals`` of the image area, and every local crop must intersect every
global crop by more than ``min_overlap``. Each constrained crop gets ``max_tries`` candidates at once
(the reference re-samples in an unbounded loop); the first that fits the image and meets the
constraint is used. If none does, the **fallback** keeps the first fitting candidate's size (or the
largest box of the crop's smallest scale that fits) and centres it on the centre of the global
crops (of their intersection for local crops), clamped into the image; the run logs the fallback
rate (``train/crop_fallback``). Settings under which the constraint cannot hold are refused by the
config (``crops.min_overlap`` above the local crops' largest area, ...), and
:func:`overlap_feasibility` measures the fallback rate before a run starts.

Photometric augmentation per crop (NeCo's recipe, the same for global and local crops): colour jitter
p .8 (brightness .8, contrast .8, saturation .8, hue .2, random order), grayscale p .2, Gaussian blur
sigma U(.1, 2) p .5. **No flips** (the box bookkeeping does not model them).

How: all boxes of one output size are cut from the canvas with one ``roi_align(aligned=True)`` call
(:func:`wtours.train.augment.crop_resize`); photometric ops are batched (:func:`wtours.train.augment.apply_photometric`).
No Python loop over images or crops; random numbers come from one seeded CPU generator
(``state_dict`` / ``load_state_dict`` for exact resume), so a seed gives the same views on CPU and GPU.

Departures from the reference: bounded candidates + fallback instead of an endless re-sampling loop;
crops cut from the loader's resized canvas (long side ``data.image_size``) instead of the original
image; GPU jitter/blur instead of PIL (blur sigma in output pixels, as PIL's radius).

Example::

    aug = NeCoAugment(NeCoCropsConfig(), seed=0)
    v = aug(images.to("cuda"), sizes.to("cuda"))       # uint8 [B, 3, H, W], int [B, 2]
    v.global_views.shape, v.local_views.shape            # [B, 2, 3, 224, 224], [B, 4, 3, 96, 96]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from wtours.objectives.boxes import box_area, box_intersection  # noqa: F401 (used here, and public here too)
from wtours.train.augment import SeededAugment, apply_photometric, crop_resize, normalize, sample_photometric


@dataclass
class NeCoViews:
    """Normalised crops and their boxes (canvas pixels, ``x0, y0, x1, y1``)."""

    global_views: torch.Tensor  # [B, G, 3, Sg, Sg]
    local_views: torch.Tensor  # [B, L, 3, Sl, Sl]
    boxes: torch.Tensor  # [B, G + L, 4] float32 (CPU-sampled, on the views' device)
    fallback: torch.Tensor  # [B, G + L] bool


# ----------------------------------------------------------------------------- geometry


def rrc_candidates(gen: torch.Generator, h: torch.Tensor, w: torch.Tensor, k: int, scale: tuple[float, float],
                   ratio: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` RandomResizedCrop candidates per image of sizes ``h, w [M]`` -> (boxes ``[M, k, 4]``, fits ``[M, k]``).

    A fixed number of random draws per call (reproducible). Candidates that do not fit are
    clamped into the image and marked ``fits = False``.
    """
    m = h.shape[0]
    u = torch.rand(m, k, 4, generator=gen, dtype=torch.float64)
    hh, ww = h.double()[:, None], w.double()[:, None]
    area = hh * ww * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    ar = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1])
    cw, ch = torch.sqrt(area * ar), torch.sqrt(area / ar)
    fits = (cw <= ww) & (ch <= hh)
    cw, ch = torch.minimum(cw, ww), torch.minimum(ch, hh)
    x0 = u[..., 2] * (ww - cw)
    y0 = u[..., 3] * (hh - ch)
    return torch.stack([x0, y0, x0 + cw, y0 + ch], dim=-1), fits


def _first_true(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the first True along the last dim (0 if none) and whether there is one."""
    return torch.argmax(mask.to(torch.int8), dim=-1), mask.any(dim=-1)


def _take(cands: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``cands [..., k, 4]``, ``idx [...]`` -> ``[..., 4]``."""
    return torch.gather(cands, -2, idx[..., None, None].expand(*idx.shape, 1, 4)).squeeze(-2)


def _centred(size_wh: torch.Tensor, centre: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Boxes of ``size_wh [..., 2]`` centred on ``centre [..., 2]``, shifted into ``[0, w] x [0, h]``."""
    bw, bh = size_wh.unbind(-1)
    x0 = (centre[..., 0] - bw / 2).clamp(min=0.0)
    y0 = (centre[..., 1] - bh / 2).clamp(min=0.0)
    x0 = torch.minimum(x0, w - bw)
    y0 = torch.minimum(y0, h - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], dim=-1)


def _min_scale_size(h: torch.Tensor, w: torch.Tensor, scale_min: float, ratio: tuple[float, float]) -> torch.Tensor:
    """Width/height ``[..., 2]`` of a box of area ``scale_min * h * w`` with the aspect closest to the
    image's inside ``ratio``, shrunk to fit."""
    ar = (w / h).clamp(ratio[0], ratio[1])
    area = scale_min * h * w
    bw, bh = torch.sqrt(area * ar), torch.sqrt(area / ar)
    return torch.stack([torch.minimum(bw, w), torch.minimum(bh, h)], dim=-1)


def sample_neco_boxes(gen: torch.Generator, sizes: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop boxes for images of ``sizes [B, 2]`` (h, w) -> (boxes ``[B, G + L, 4]`` float64, fallback ``[B, G + L]``).

    See the module docstring for the constraint and the fallback. ``cfg``: a
    :class:`wtours.stages.neco.config.NeCoCropsConfig` (or anything with its fields).
    """
    b = sizes.shape[0]
    h, w = sizes[:, 0].double(), sizes[:, 1].double()
    img_area = h * w
    k, gn, ln = cfg.max_tries, cfg.global_number, cfg.local_number
    ratio = tuple(cfg.ratio)
    # global crop 0: a plain RandomResizedCrop (torchvision: first fitting draw, else a centre crop)
    c0, fit0 = rrc_candidates(gen, h, w, k, tuple(cfg.global_scale), ratio)
    i0, ok0 = _first_true(fit0)
    g0 = _take(c0, i0)
    centre_full = torch.stack([w / 2, h / 2], dim=-1)
    g0 = torch.where(ok0[:, None], g0, _centred(_min_scale_size(h, w, 1.0, ratio), centre_full, h, w))
    globals_ = [g0]
    fb = [~ok0]
    if gn > 1:  # further global crops: overlap with global 0 > min_overlap_globals (one draw per crop, vectorised)
        cg, fitg = rrc_candidates(gen, h.repeat_interleave(gn - 1), w.repeat_interleave(gn - 1), k,
                                  tuple(cfg.global_scale), ratio)
        cg, fitg = cg.view(b, gn - 1, k, 4), fitg.view(b, gn - 1, k)
        inter = box_area(box_intersection(cg, g0[:, None, None, :]))
        good = fitg & (inter > cfg.min_overlap_globals * img_area[:, None, None])
        ig, okg = _first_true(good)
        gi = _take(cg, ig)
        size_wh = _fallback_size(cg, fitg, h, w, cfg.global_scale[0], ratio)
        centre = ((g0[:, :2] + g0[:, 2:]) / 2)[:, None, :].expand(b, gn - 1, 2)
        gi = torch.where(okg[..., None], gi, _centred(size_wh, centre, h[:, None], w[:, None]))
        globals_.append(gi)
        fb.append(~okg)
    glob = torch.cat([g.view(b, -1, 4) for g in globals_], dim=1)  # [B, G, 4]
    fb_g = torch.cat([f.view(b, -1) for f in fb], dim=1)
    if ln == 0:
        return glob, fb_g
    cl, fitl = rrc_candidates(gen, h.repeat_interleave(ln), w.repeat_interleave(ln), k, tuple(cfg.local_scale), ratio)
    cl, fitl = cl.view(b, ln, k, 4), fitl.view(b, ln, k)
    inter = box_area(box_intersection(cl[:, :, :, None, :], glob[:, None, None, :, :]))  # [B, L, k, G]
    good = fitl & (inter > cfg.min_overlap * img_area[:, None, None, None]).all(dim=-1)
    il, okl = _first_true(good)
    loc = _take(cl, il)
    common = glob[:, 0]
    for gi in range(1, gn):  # tiny (G = 2): the intersection of the global crops
        common = box_intersection(common, glob[:, gi])
    centre = ((common[:, :2] + common[:, 2:]) / 2)[:, None, :].expand(b, ln, 2)
    size_wh = _fallback_size(cl, fitl, h, w, cfg.local_scale[0], ratio)
    loc = torch.where(okl[..., None], loc, _centred(size_wh, centre, h[:, None], w[:, None]))
    return torch.cat([glob, loc], dim=1), torch.cat([fb_g, ~okl], dim=1)


def _fallback_size(cands: torch.Tensor, fits: torch.Tensor, h: torch.Tensor, w: torch.Tensor, scale_min: float,
                   ratio: tuple[float, float]) -> torch.Tensor:
    """``[B, n, 2]``: the first fitting candidate's size, or the smallest-scale box that fits."""
    i, ok = _first_true(fits)
    first = _take(cands, i)
    wh = torch.stack([first[..., 2] - first[..., 0], first[..., 3] - first[..., 1]], dim=-1)
    small = _min_scale_size(h, w, scale_min, ratio)[:, None, :].expand_as(wh)
    return torch.where(ok[..., None], wh, small)


def overlap_feasibility(cfg: Any, height: int, width: int, trials: int = 256, seed: int = 0) -> float:
    """Fallback rate of :func:`sample_neco_boxes` on ``trials`` images of ``height x width`` (0..1)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[height, width]] * trials)
    _, fb = sample_neco_boxes(gen, sizes, cfg)
    return float(fb[:, 1:].float().mean()) if fb.shape[1] > 1 else 0.0


# ----------------------------------------------------------------------------- the augmenter


class NeCoAugment(SeededAugment):
    """NeCo multi-crop of uint8 canvases on their own device (see the module docstring).

    Args:
        cfg: a :class:`wtours.stages.neco.config.NeCoCropsConfig`.
        seed: seeds the CPU generator of all random parameters (give each rank its own).
    """

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, sizes: torch.Tensor) -> NeCoViews:
        """``images`` uint8 ``[B, 3, H, W]``, ``sizes [B, 2]`` (valid ``h, w``) -> :class:`NeCoViews` (fp32,
        also inside an autocast region)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self._augment(images, sizes.to("cpu"))

    def _augment(self, images: torch.Tensor, sizes: torch.Tensor) -> NeCoViews:
        c, g = self.cfg, self.generator
        b = images.shape[0]
        gn, ln = c.global_number, c.local_number
        dev = images.device
        boxes, fallback = sample_neco_boxes(g, sizes, c)  # CPU, [B, V, 4]
        v = gn + ln
        photo = sample_photometric(g, b * v, c.jitter_p, c.brightness, c.contrast, c.saturation, c.hue,
                                   c.grayscale_p, c.blur_p, tuple(c.blur_sigma))  # CPU: apply_photometric moves it
        # (kept on the CPU so that its hue indices need no device-to-host copy)
        frames = images.float()
        idx = torch.arange(b, device=dev)
        bx = boxes.float().to(dev, non_blocking=True)
        gv = crop_resize(frames, bx[:, :gn].reshape(-1, 4), idx.repeat_interleave(gn), c.global_size).div_(255.0)
        sel = torch.arange(b * v).view(b, v)
        gv = apply_photometric(gv, photo.expand(sel[:, :gn].reshape(-1)), c.blur_sigma[1])
        global_views = normalize(gv).view(b, gn, 3, c.global_size, c.global_size)
        if ln > 0:
            lv = crop_resize(frames, bx[:, gn:].reshape(-1, 4), idx.repeat_interleave(ln), c.local_size).div_(255.0)
            lv = apply_photometric(lv, photo.expand(sel[:, gn:].reshape(-1)), c.blur_sigma[1])
            local_views = normalize(lv).view(b, ln, 3, c.local_size, c.local_size)
        else:
            local_views = torch.zeros(b, 0, 3, c.local_size, c.local_size, device=dev)
        return NeCoViews(global_views=global_views, local_views=local_views, boxes=bx,
                         fallback=fallback.to(dev, non_blocking=True))
