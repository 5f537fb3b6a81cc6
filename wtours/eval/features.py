"""Dense features of every selected frame, plus its ground truth at the evaluation resolutions.

Frames are decoded and resized on CPU threads (PIL; JPEG decoding releases the GIL) while the
previous batch runs through the network, so decoding overlaps the forward pass. Following TimeT
(``evaluation.py``): frames are resized to exactly ``input_size`` (default 224x224: the aspect
ratio is *not* kept, DAVIS 854x480 is squashed), normalised with the ImageNet mean / std
(the reference's training transform has a 0.228 typo for the red std; the standard 0.229 is
used), and the features are the **last block's patch tokens after the final norm**, prefix
tokens (CLS, registers) dropped: ``timm`` ``forward_features`` output. bf16 autocast on CUDA,
``torch.inference_mode``. Masks are resized with nearest neighbour to each evaluation size.

Shapes: ``grid`` [NF, D, h, w] (fp32, on the device), ``gt[size]`` [NF, H, W] uint8 (raw
evaluation labels, 255 = ignore), ``frame_seq`` [NF] (index of each frame's sequence).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from wtours.errors import UserError
from wtours.eval.datasets import Dataset, Sequence, load_mask

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# |feature| past this is an encoder that diverged (after the final norm a sane ViT's values are < ~1e3);
# features this large also overflow the fp32 squared distances of k-means
FEATURE_BOUND = 1e5


def feature_problem(x: torch.Tensor, bound: float = FEATURE_BOUND) -> str | None:
    """What is wrong with features ``x`` (non-finite values, or values past ``bound``), or None."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        return f"{bad} of {x.numel()} feature values are not finite"
    top = float(x.abs().max()) if x.numel() else 0.0
    return f"features reach {top:.3g}, past the sane bound {bound:g}" if top > bound else None


@dataclass
class FeatureSet:
    grid: torch.Tensor  # [NF, D, h, w]
    gt: dict[tuple[int, int], torch.Tensor]  # (H, W) -> [NF, H, W] uint8
    frame_seq: torch.Tensor  # [NF] long
    native_sizes: list[tuple[int, int]]  # (H, W) of every frame
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_frames(self) -> int:
        return int(self.grid.shape[0])


def _load_one(seq: Sequence, i: int, input_size: tuple[int, int], sizes: list[tuple[int, int]]):
    from PIL import Image

    fpath, mpath = seq.frames[i], seq.masks[i]
    try:
        with Image.open(fpath) as im:
            native = (im.height, im.width)
            img = np.asarray(im.convert("RGB").resize((input_size[1], input_size[0]), Image.BILINEAR))
    except Exception as e:  # noqa: BLE001 - any decoding failure is a bad file
        raise UserError(f"cannot read frame ({type(e).__name__}: {e})", path=fpath) from None
    mask = load_mask(mpath, seq.lut, seq.id_rule)
    if mask.shape != native:
        raise UserError(f"mask is {mask.shape[1]}x{mask.shape[0]} but its frame is {native[1]}x{native[0]}", path=mpath)
    m = Image.fromarray(mask)
    gts = [np.asarray(m.resize((w, h), Image.NEAREST)) if (h, w) != native else mask for (h, w) in sizes]
    return img, gts, native


def iter_batches(dataset: Dataset, input_size, sizes, batch_size: int, workers: int, prefetch: int = 2):
    """Yield (imgs uint8 [B, h, w, 3], [gt uint8 [B, H, W] per size], natives) in dataset order."""
    items = [(s, i) for s in dataset.sequences for i in range(len(s.frames))]
    chunks = [items[j : j + batch_size] for j in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()

        def submit(chunk):
            return [pool.submit(_load_one, s, i, input_size, sizes) for s, i in chunk]

        it = iter(chunks)
        for _ in range(prefetch):
            nxt = next(it, None)
            if nxt is not None:
                pending.append(submit(nxt))
        while pending:
            futs = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(submit(nxt))
            out = [f.result() for f in futs]
            imgs = np.stack([o[0] for o in out])
            gts = [np.stack([o[1][j] for o in out]) for j in range(len(sizes))]
            yield imgs, gts, [o[2] for o in out]


def patch_tokens(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] normalised images -> [B, D, H/p, W/p] last-layer patch tokens (after norm)."""
    tokens = model.forward_features(x)
    n_prefix = int(getattr(model, "num_prefix_tokens", 1))
    tokens = tokens[:, n_prefix:]
    p = model.patch_embed.patch_size
    h, w = x.shape[-2] // p[0], x.shape[-1] // p[1]
    if tokens.shape[1] != h * w:
        raise UserError(f"model returned {tokens.shape[1]} patch tokens, expected {h}x{w}; is it a timm ViT?")
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)


def extract_features(
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device,
    input_size: tuple[int, int] = (224, 224),
    eval_sizes: list[tuple[int, int]] = ((224, 224),),
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    floor_to_patch: bool = False,
    source: str | None = None,
) -> FeatureSet:
    """Run ``model`` over every selected frame of ``dataset`` -> :class:`FeatureSet`.

    ``workers``: decoding threads (0: one per CPU core, at most 32). ``mean`` / ``std``: the normalisation
    (a protocol's own, e.g. DINO's 0.228 or open-hummingbird's 0.255). ``floor_to_patch``: an input size that
    is not a multiple of the patch size is cropped (bottom / right) to one, as a strided patch conv floors it
    (DINO's video segmentation at patch 14); otherwise such a size is the caller's error. Non-finite or
    overflowing features (:func:`feature_problem`) raise :class:`UserError` naming ``source`` (the checkpoint)."""
    import os

    from tqdm import tqdm

    workers = workers or min(32, os.cpu_count() or 1)
    sizes = [tuple(s) for s in dict.fromkeys(tuple(s) for s in eval_sizes)]
    model = model.to(device).eval()
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    p = model.patch_embed.patch_size
    cuda = device.type == "cuda"
    grids, gts, natives = [], [[] for _ in sizes], []
    t0 = time.perf_counter()
    bar = tqdm(total=dataset.n_frames, desc="features", unit="frame", file=sys.stderr, disable=not progress, leave=False)
    with torch.inference_mode():
        for imgs, batch_gts, nat in iter_batches(dataset, tuple(input_size), sizes, batch_size, workers):
            x = torch.from_numpy(imgs)
            if cuda:
                x = x.pin_memory().to(device, non_blocking=True)
            x = (x.permute(0, 3, 1, 2).float() - mean) / std
            if floor_to_patch:
                x = x[..., : x.shape[-2] // p[0] * p[0], : x.shape[-1] // p[1] * p[1]]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                g = patch_tokens(model, x)
            grids.append(g.float())
            for j, m in enumerate(batch_gts):
                gts[j].append(torch.from_numpy(m).to(device, non_blocking=cuda))
            natives.extend(nat)
            bar.update(len(imgs))
    bar.close()
    grid = torch.cat(grids)
    problem = feature_problem(grid)
    if problem:
        raise UserError(f"{problem}: the weights diverged; evaluate an earlier checkpoint",
                        path=source or "the encoder")
    if cuda:
        torch.cuda.synchronize(device)
    seconds = {"features": time.perf_counter() - t0}
    frame_seq = torch.cat(
        [torch.full((len(s.frames),), i, dtype=torch.long) for i, s in enumerate(dataset.sequences)]
    ).to(device)
    return FeatureSet(
        grid, {s: torch.cat(g) for s, g in zip(sizes, gts)}, frame_seq, natives, seconds
    )


def gt_patch_features(feats: FeatureSet, n_ids: int = 256, ignore: int = 255) -> FeatureSet:
    """The **oracle** feature field of a :class:`FeatureSet`: per patch the fraction of its pixels holding each
    raw label id (``[NF, n_ids, h, w]``, the ignore id left out), from the largest ground truth it holds.

    Two patches are then alike exactly when their labels are, so an instrument scores what patch resolution
    allows at best (``wtours bench instruments``' oracle row). Labels are raw ids, so the field is consistent
    across separately extracted sets (memory and queries). The field is scaled by ``sqrt(n_ids)``, so that a pure
    patch has the norm of a layer-normalised token of that width (what the linear probe's learning rate is set
    for; the cosine- and PCA-based instruments do not see the scale)."""
    nf, _, h, w = feats.grid.shape
    size = max(feats.gt, key=lambda s: s[0] * s[1])
    gt = feats.gt[size]
    out = torch.zeros(nf, n_ids, h, w, device=feats.grid.device)
    for i in torch.unique(gt).tolist():
        if i == ignore or i >= n_ids:
            continue
        out[:, i] = torch.nn.functional.adaptive_avg_pool2d((gt == i).float()[:, None], (h, w))[:, 0]
    out *= n_ids ** 0.5
    return FeatureSet(out, feats.gt, feats.frame_seq, feats.native_sizes, feats.seconds)
