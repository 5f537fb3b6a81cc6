"""GT-supervised training of an encoder: the upper reference of the instruments' calibration and of the curve.

The question "does self-supervised training help?" needs a scale: how far can the *same* architecture get with the
*same* budget when it is told the answer? This module trains a ViT from its random initialisation with per-pixel
category labels and exports ``backbone.pt`` files that every instrument reads like any other encoder.

Data: a synthetic YouTube-VOS-layout set (:func:`supervised_set`, ``wtours.video.synth.write_ytvos_like``) of scenes
drawn with ``seed + SEED_OFFSET``, so neither the training tour nor the evaluation sets (seed ``seed``) contain them.
Every annotated frame is decoded once into memory at ``short_side`` (uint8 ``[N, 3, H, W]``, labels ``[N, H, W]``:
category ids 1..C of ``meta.json``, 0 background, 255 ignore).

Step (one batch of ``batch`` frames, all on the device, no Python loop over frames):

1. random resized crops (area 0.3-1 of the frame, aspect 3/4-4/3) and horizontal flips as one affine grid per frame;
   ``grid_sample`` bilinear for images, nearest for labels -> ``[B, 3, S, S]``, ``[B, S, S]`` (S = ``crop_size``);
2. ImageNet normalisation, ``forward_features`` -> patch tokens ``[B, D, S/p, S/p]`` (prefix tokens dropped);
3. a linear layer (1x1 conv, ``D -> C + 1``) -> logits, bilinear to ``S x S``, cross-entropy (ignore 255);
4. AdamW (lr ``lr`` after a linear warm-up of ``warmup`` steps, cosine to 1 % of it, weight decay 0.04 on
   matrices only), fp32 on CPU, bf16 autocast on CUDA.

The linear head is thrown away: ``backbone.pt`` holds the ViT alone (``meta["supervised"]`` says how it was made).
With ``snapshots`` the backbone is also exported at those steps (the curve's points).

    from wtours.bench.supervised import supervised_set, train_supervised
    root = supervised_set("runs/proof/data/supervised", sequences=16, seq_frames=12, height=180, width=320, seed=0)
    paths = train_supervised("vit_nano_patch8_64", root, "runs/proof/supervised0", steps=300, batch=16, seed=0)
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wtours.errors import UserError
from wtours.fsutil import ensure_dir

SEED_OFFSET = 7919  # scenes of the supervised set: seed + this (the tour and the eval sets use seed itself)


def supervised_set(root: str | Path, sequences: int, seq_frames: int, height: int, width: int, seed: int) -> Path:
    """A labelled synthetic YTVOS-layout set at ``root`` (reused when it was written with the same parameters)."""
    from wtours.video.synth import write_ytvos_like

    root = Path(root)
    want = {"sequences": sequences, "seq_frames": seq_frames, "height": height, "width": width,
            "seed": seed + SEED_OFFSET}
    stamp = root / "supervised.json"
    try:
        if json.loads(stamp.read_text()) == want:
            return root
    except (OSError, ValueError):
        pass
    write_ytvos_like(root, sequences, seq_frames, height, width, seed=seed + SEED_OFFSET)
    from wtours.fsutil import write_json

    write_json(stamp, want)
    return root


def load_frames(root: str | Path, short_side: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every annotated frame of a YTVOS-layout set -> (uint8 images ``[N, 3, H, W]``, uint8 labels ``[N, H, W]``,
    number of categories C); frames resized so that their short side is ``short_side``."""
    from PIL import Image

    from wtours.eval.datasets import load_mask, read_dataset

    ds = read_dataset("ytvos", root, frames_per_clip=0)
    imgs, labels = [], []
    for seq in ds.sequences:
        for f, m in zip(seq.frames, seq.masks):
            with Image.open(f) as im:
                w, h = im.size
                s = short_side / min(w, h)
                size = (max(1, round(w * s)), max(1, round(h * s)))
                imgs.append(np.asarray(im.convert("RGB").resize(size, Image.BILINEAR)))
            lab = Image.fromarray(load_mask(m, seq.lut, seq.id_rule)).resize(size, Image.NEAREST)
            labels.append(np.asarray(lab))
    if not imgs:
        raise UserError("no annotated frames in the supervised set", path=root)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(labels)), len(ds.categories or [])


def crop_grids(n: int, aspect: float, gen: torch.Generator, scale: tuple[float, float] = (0.3, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Affine sampling matrices ``[n, 2, 3]`` (normalised coordinates) of random resized crops with flips.

    ``aspect`` = frame width / height. A crop covers ``area`` of the frame with width/height ratio ``r`` in pixels;
    its box is clamped inside the frame (so it never samples padding).
    """
    area = torch.empty(n).uniform_(*scale, generator=gen)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = torch.exp(log_r)
    # half-extents in normalised units [-1, 1]: w_n * h_n = area, (w_n * aspect) / h_n = r
    hw = torch.sqrt(area * r / aspect).clamp(max=1.0)
    hh = torch.sqrt(area * aspect / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - hw)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - hh)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = hw * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = hh
    theta[:, 1, 2] = cy
    return theta


def train_supervised(arch: str, data_root: str | Path, out_dir: str | Path, steps: int, batch: int, seed: int,
                     lr: float = 1e-3, warmup: int | None = None, short_side: int = 96, crop_size: int = 64,
                     snapshots: Sequence[int] = (), device: str | torch.device | None = None,
                     progress: bool = False) -> dict[int, Path]:
    """Train ``random:<arch>@<seed>`` with GT labels for ``steps`` steps of ``batch`` frames.

    Writes ``<out_dir>/backbone.pt`` (and ``<out_dir>/step<k>/backbone.pt`` for every ``k`` in ``snapshots``) and
    returns ``{step: path}``. Reuses a finished run of the same settings (``<out_dir>/supervised.json``).
    """
    from wtours.eval.features import IMAGENET_MEAN, IMAGENET_STD, patch_tokens
    from wtours.fsutil import write_json
    from wtours.models.weights import export_backbone, load_backbone

    if steps < 1 or batch < 1:
        raise UserError(f"supervised training needs steps >= 1 and batch >= 1 (got {steps}, {batch})")
    out = ensure_dir(out_dir)
    marks = sorted({int(s) for s in snapshots if 0 < int(s) < steps})
    paths = {s: out / f"step{s}" / "backbone.pt" for s in marks}
    paths[steps] = out / "backbone.pt"
    settings = {"arch": arch, "data": str(data_root), "steps": steps, "batch": batch, "seed": seed, "lr": lr,
                "warmup": warmup, "short_side": short_side, "crop_size": crop_size, "snapshots": marks}
    stamp = out / "supervised.json"
    try:
        if json.loads(stamp.read_text()) == settings and all(p.is_file() for p in paths.values()):
            return paths
    except (OSError, ValueError):
        pass
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels, n_cat = load_frames(data_root, short_side)
    images, labels = images.to(dev), labels.to(dev)
    n, _, h, w = images.shape
    model, _ = load_backbone(f"random:{arch}@{seed}")
    model = model.to(dev).train()
    head = torch.nn.Conv2d(model.num_features, n_cat + 1, 1).to(dev)
    torch.nn.init.trunc_normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    params = list(model.named_parameters()) + [(f"head.{k}", v) for k, v in head.named_parameters()]
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.04}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr)
    warm = max(1, steps // 10) if warmup is None else max(0, warmup)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1) * 255
    gen = torch.Generator().manual_seed(seed)
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    losses = []
    for step in range(1, steps + 1):
        f = lr * (step / warm if step <= warm else
                  0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))
        for g in opt.param_groups:
            g["lr"] = f
        idx = torch.randint(0, n, (batch,), generator=gen).to(dev)
        theta = crop_grids(batch, w / h, gen).to(dev)
        grid = F.affine_grid(theta, [batch, 3, crop_size, crop_size], align_corners=False)
        x = F.grid_sample(images[idx].float(), grid, mode="bilinear", align_corners=False)
        y = F.grid_sample(labels[idx].unsqueeze(1).float(), grid, mode="nearest", align_corners=False)
        y = y.squeeze(1).long()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = head(patch_tokens(model, (x - mean) / std))
        logits = F.interpolate(logits.float(), size=(crop_size, crop_size), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps:
            losses.append((step, float(loss.detach())))
            if progress:
                print(f"supervised {arch}@{seed}: step {step}/{steps} loss {losses[-1][1]:.3f}", flush=True)
        if step in paths:
            if not math.isfinite(float(loss.detach())):
                raise UserError(f"supervised training diverged at step {step} (loss {float(loss.detach())})", path=out)
            meta = {"supervised": {**settings, "step": step, "categories": n_cat, "frames": n,
                                   "seconds": time.perf_counter() - t0, "losses": losses}, "steps": step}
            ensure_dir(paths[step].parent)
            export_backbone(model, arch, paths[step], meta)
    write_json(stamp, settings)
    return paths
