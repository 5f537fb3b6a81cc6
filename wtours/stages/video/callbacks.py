"""Stage 1's callbacks.

* :class:`MaskPictures`: every ``every`` steps, the teacher's tracked object masks on a fixed clip
  (the first clip the run sees, kept in the checkpoint) as ``pictures/masks_step{N:06d}.png``:
  row 1 the frames, row 2 the ``k`` objects as coloured overlays (TimeT alone: its forwarded labels,
  ``pictures/labels_step{N:06d}.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from wtours.fsutil import atomic_open, ensure_dir
from wtours.train.callbacks import PeriodicPictures

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
                    (70, 240, 240), (245, 130, 48), (240, 50, 230)], dtype=np.float32)


def mask_overlays(frames: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int],
                  maps: torch.Tensor | None = None, alpha: float = 0.55) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``[T, 3, G, G]`` in [0, 1] and the ``k`` object masks ``[T, k, N]`` (bool, ``N = gh*gw``) ->
    ``(frames, overlays)``, both ``[T, G, G, 3]`` uint8: each object's patches tinted with ``PALETTE[object]``.
    Masks may overlap; with the tracking ``maps [T, k, N]`` a patch in several masks takes the colour of its
    strongest object."""
    t, _, hh, ww = frames.shape
    k = masks.shape[1]
    gh, gw = grid
    img = frames.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255.0  # [T, H, W, 3]
    m = masks.detach().cpu().reshape(t, k, gh, gw).numpy().astype(np.float32)
    if maps is not None:  # one object per patch: the strongest of the masks covering it
        score = np.where(m > 0, maps.detach().float().cpu().reshape(t, k, gh, gw).numpy(), -np.inf)
        best = score.argmax(axis=1)  # [T, gh, gw]
        m = (np.arange(k)[None, :, None, None] == best[:, None]) & (m > 0)
        m = m.astype(np.float32)
    ry, rx = hh // gh, ww // gw
    m = m.repeat(ry, axis=2).repeat(rx, axis=3)  # [T, k, gh*ry, gw*rx]
    pad_h, pad_w = hh - m.shape[2], ww - m.shape[3]
    m = np.pad(m, ((0, 0), (0, 0), (0, pad_h), (0, pad_w)))
    over = img.copy()
    for j in range(k):  # k is tiny (objects), not a per-frame loop
        a = (alpha * m[:, j])[..., None]
        over = over * (1.0 - a) + PALETTE[j % len(PALETTE)] * a
    return img.clip(0, 255).astype(np.uint8), over.clip(0, 255).astype(np.uint8)


def render_masks_png(frames: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int],
                     maps: torch.Tensor | None = None, min_size: int = 128, alpha: float = 0.55) -> bytes:
    """PNG bytes (matplotlib): the clip's frames in a row, below them the tracked objects
    (:func:`mask_overlays`), column headers and a legend naming each object's colour; ``min_size``: the
    shown size of a frame in pixels."""
    from wtours.figures import image_grid

    img, over = mask_overlays(frames, masks, grid, maps, alpha)
    k = masks.shape[1]
    return image_grid([list(img), list(over)], col_titles=[f"frame {i}" for i in range(len(img))],
                      row_titles=["clip", "tracked objects"], cell=min_size / 64,
                      legend=[(f"object {j + 1}", PALETTE[j % len(PALETTE)] / 255.0) for j in range(k)])


class MaskPictures(PeriodicPictures):
    """Every ``every`` optimizer steps (and at the end): tracked masks on a fixed clip -> PNG."""

    def __init__(self, out_dir: str | Path, every: int) -> None:
        super().__init__(out_dir, every)
        self.clip: torch.Tensor | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clip = state_dict.get("clip")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.clip is None:
            self.clip = batch["clip"][0].detach().to("cpu", copy=True)

    def write(self, trainer: Any, pl_module: Any) -> Path | None:
        step = trainer.global_step
        if self.clip is None or step == self._last or not trainer.is_global_zero:
            return None
        self._last = step
        clip = self.clip.to(pl_module.device)
        if "dora" in pl_module.objective.weights:  # DoRA's tracked objects
            frames, masks, grid, maps = pl_module.track_clip(clip)
            name = "masks"
        else:  # TimeT alone: its forwarded labels (the 8 most frequent)
            frames, masks, grid, maps = pl_module.timet_clip_labels(clip)
            name = "labels"
        path = ensure_dir(self.out_dir) / f"{name}_step{step:06d}.png"
        with atomic_open(path, "wb") as f:
            f.write(render_masks_png(frames, masks, grid, maps))
        self.written.append(path)
        return path
