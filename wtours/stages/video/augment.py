"""Batched GPU multi-crop for video clips (DoRA's recipe, ``shared/reference/dora.md`` §1.3).

Input: a batch of uint8 clips ``[B, T, 3, H, W]`` straight from the loader (moved to the device).
Output (:class:`AugmentedViews`), ImageNet-normalised float32:

* ``global_views [B, T, 3, G, G]``: one global view per frame; its crop box and horizontal flip
  are **shared by all frames of a clip** (clip-level pre-crop ``P x P`` at scale .2-1, then a
  ``G x G`` crop at scale .4-1 of it, flip p .5; ``views_from="frame"``: no pre-crop, the views are
  RandomResizedCrops of the whole frame, as TimeT's reference cuts them);
* ``local_views [B, T, V, 3, L, L]``: ``V`` local crops per frame from the same pre-crop at scale
  .05-.4, **independent per frame** (no flip by default, as in the reference);
* photometric ops per frame (or per clip, ``photometric="clip"``): colour jitter p .8
  (brightness .4, contrast .4, saturation .2, hue .1, in a random order per image, as
  torchvision's ``ColorJitter``), grayscale p .2, Gaussian blur sigma U(.1, 2) with p .1 (global)
  and .5 (local).

How: every crop is a box in source-frame pixels (the pre-crop box composed with the view's box in
the ``P x P`` pre-crop canvas), and all boxes of one output size are cut out of the uint8 frames
with **one** ``torchvision.ops.roi_align(aligned=True)`` call, whose adaptive sampling averages
``ceil(box/out)`` points per bin (anti-aliased downscaling, no intermediate ``P x P`` image).
The photometric ops are kornia's functional ops (``kornia.enhance``, ``kornia.filters``) with
per-image parameter tensors; no Python loop over frames, crops or images, no host sync. All random parameters come from one seeded CPU
``torch.Generator`` (``state_dict`` / ``load_state_dict`` for exact resume), so a seed gives the
same views on CPU and GPU.

Departures from the reference: crops composed into one resampling from the source frame
instead of ``4K -> 300 -> 224`` (two resamplings; same geometry); bilinear instead of bicubic
for local crops; float boxes instead of integer pixel boxes.

Example::

    aug = ClipAugment(CropsConfig(), seed=0)
    views = aug(clips.to("cuda"))          # uint8 [B, T, 3, H, W]
    views.global_views.shape               # [B, T, 3, 224, 224]
    views.local_views.shape                # [B, T, 6, 3, 112, 112]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the shared primitives (also re-exported here: ``from wtours.stages.video.augment import crop_resize`` works)
from wtours.train.augment import (IMAGENET_MEAN, IMAGENET_STD, SeededAugment, adjust_hue, apply_photometric,  # noqa: F401
                                  compose_boxes, crop_fit_problem, crop_resize, denormalize, gaussian_blur,
                                  max_fitting_scale, normalize, one_jitter_op, rgb_to_gray, sample_photometric,
                                  sample_resized_crop_boxes, PhotometricParams)


@dataclass
class AugmentedViews:
    """Normalised views plus the geometry that produced them (boxes in source pixels x0,y0,x1,y1)."""

    global_views: torch.Tensor  # [B, T, 3, G, G]
    local_views: torch.Tensor  # [B, T, V, 3, L, L]
    global_boxes: torch.Tensor  # [B, 4] (shared by the clip's frames)
    local_boxes: torch.Tensor  # [B, T, V, 4]
    flips: torch.Tensor  # [B] bool, global view flipped


# ----------------------------------------------------------------------------- the clip augmenter


class ClipAugment(SeededAugment):
    """DoRA multi-crop of uint8 clips on their own device (see the module docstring).

    Args:
        cfg: a :class:`wtours.stages.video.config.CropsConfig` (or anything with its fields).
        seed: seeds the CPU generator of all random parameters (give each rank its own).
    """

    def _photometric(self, n_groups: int, per_group: int, blur_p: float) -> PhotometricParams:
        """Params for ``n_groups x per_group`` images; shared within a group in "clip" mode."""
        c = self.cfg
        shared = c.photometric == "clip"
        n = n_groups if shared else n_groups * per_group
        p = sample_photometric(self.generator, n, c.jitter_p, c.brightness, c.contrast, c.saturation, c.hue,
                               c.grayscale_p, blur_p, tuple(c.blur_sigma))
        if getattr(c, "jitter_ops", "all") == "one":
            p = one_jitter_op(p)
        if shared:
            p = p.expand(torch.arange(n_groups).repeat_interleave(per_group))
        return p

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> AugmentedViews:
        """``clips`` uint8 ``[B, T, 3, H, W]`` -> :class:`AugmentedViews` on the same device (fp32,
        also inside an autocast region)."""
        if clips.dim() != 5 or clips.shape[2] != 3:
            raise ValueError(f"expected clips [B, T, 3, H, W], got {tuple(clips.shape)}")
        with torch.autocast(device_type=clips.device.type, enabled=False):
            return self._augment(clips)

    def _augment(self, clips: torch.Tensor) -> AugmentedViews:
        c, g = self.cfg, self.generator
        b, t, _, h, w = clips.shape
        v = c.local_number
        dev = clips.device
        canvas = float(c.precrop_size)

        # geometry (CPU, small): pre-crop + global box per clip, local boxes per frame and crop
        if getattr(c, "views_from", "precrop") == "frame":  # TimeT's reference: RandomResizedCrop of the frame
            gbox = sample_resized_crop_boxes(g, b, h, w, tuple(c.global_scale), tuple(c.ratio))  # [B, 4]
            flips = torch.rand(b, generator=g) < c.flip_p
            lbox = sample_resized_crop_boxes(g, b * t * v, h, w, tuple(c.local_scale), tuple(c.ratio)).view(b, t, v, 4)
        else:
            pre = sample_resized_crop_boxes(g, b, h, w, tuple(c.precrop_scale), tuple(c.ratio))  # [B, 4]
            gbox = compose_boxes(pre, sample_resized_crop_boxes(g, b, canvas, canvas, tuple(c.global_scale),
                                                                tuple(c.ratio)), canvas)  # [B, 4]
            flips = torch.rand(b, generator=g) < c.flip_p
            lbox = sample_resized_crop_boxes(g, b * t * v, canvas, canvas, tuple(c.local_scale), tuple(c.ratio))
            lbox = compose_boxes(pre[:, None, None, :], lbox.view(b, t, v, 4), canvas)  # [B, T, V, 4]
        lflips = torch.rand(b * t * v, generator=g) < c.local_flip_p
        pg = self._photometric(b, t, c.blur_global_p)
        pl = self._photometric(b * v, t, c.blur_local_p)  # groups = (clip, crop) in clip mode
        if c.photometric == "clip":  # reorder (b, v, t) -> (b, t, v)
            pl = pl.expand(torch.arange(b * v * t).view(b, v, t).transpose(1, 2).reshape(-1))

        frames = clips.reshape(b * t, 3, h, w).float()  # one conversion for both crop sizes
        fidx = torch.arange(b * t, device=dev)
        gb = gbox.to(dev, non_blocking=True).repeat_interleave(t, dim=0)  # [B*T, 4]
        gv = crop_resize(frames, gb, fidx, c.global_size).div_(255.0)  # [B*T, 3, G, G]
        flip_f = flips.to(dev, non_blocking=True).repeat_interleave(t).view(-1, 1, 1, 1)
        gv = torch.where(flip_f, gv.flip(-1), gv)
        gv = apply_photometric(gv, pg, c.blur_sigma[1])  # params on the CPU: hue indices without a sync
        global_views = normalize(gv).view(b, t, 3, c.global_size, c.global_size)

        if v > 0:
            lb = lbox.to(dev, non_blocking=True).reshape(b * t * v, 4)
            lv = crop_resize(frames, lb, fidx.repeat_interleave(v), c.local_size).div_(255.0)
            lv = torch.where(lflips.to(dev, non_blocking=True).view(-1, 1, 1, 1), lv.flip(-1), lv)
            lv = apply_photometric(lv, pl, c.blur_sigma[1])
            local_views = normalize(lv).view(b, t, v, 3, c.local_size, c.local_size)
        else:
            local_views = torch.zeros(b, t, 0, 3, c.local_size, c.local_size, device=dev)
        return AugmentedViews(global_views=global_views, local_views=local_views, global_boxes=gbox,
                              local_boxes=lbox, flips=flips)
