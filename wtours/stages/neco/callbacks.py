"""NeCo's callbacks.

* :class:`PCAPictures`: every ``every`` steps, fixed images and the first 3 PCA components of the student's
  patch features as ``pictures/pca_step{N:06d}.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wtours.fsutil import ensure_dir
from wtours.train.callbacks import PeriodicPictures


class PCAPictures(PeriodicPictures):
    """Every ``every`` optimizer steps (and at the end): fixed images (the run's first 4, kept in the
    checkpoint) and the first 3 PCA components of the student's patch features, as
    ``pictures/pca_step{N:06d}.png`` (row 1 images, row 2 features as RGB)."""

    def __init__(self, out_dir: str | Path, every: int, count: int = 4) -> None:
        super().__init__(out_dir, every)
        self.count = count
        self.images: Any = None
        self.sizes: Any = None

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "sizes": self.sizes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images, self.sizes = state_dict.get("images"), state_dict.get("sizes")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.images is None:
            self.images = batch["image"][: self.count].detach().to("cpu", copy=True)
            self.sizes = batch["size"][: self.count].detach().to("cpu", copy=True)

    def write(self, trainer: Any, pl_module: Any) -> Path | None:
        step = trainer.global_step
        if self.images is None or step == self._last or not trainer.is_global_zero:
            return None
        self._last = step
        crops, pca = pl_module.pca_features(self.images.to(pl_module.device), self.sizes)
        from wtours.fsutil import atomic_open

        path = ensure_dir(self.out_dir) / f"pca_step{step:06d}.png"
        with atomic_open(path, "wb") as f:
            f.write(render_pca_png(crops, pca))
        self.written.append(path)
        return path


def render_pca_png(crops: Any, pca: Any, min_size: int = 128) -> bytes:
    """PNG bytes: crops ``[M, 3, S, S]`` in a row, their PCA maps ``[M, 3, g, g]`` (nearest-upsampled) below."""
    import io

    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    m, _, s, _ = crops.shape
    up = F.interpolate(pca.float().cpu(), size=(s, s), mode="nearest")
    rows = [crops.float().cpu(), up]
    scale = max(1, -(-min_size // s))
    gap = 2
    canvas = np.full((2 * s * scale + gap, m * (s * scale + gap) - gap, 3), 255, dtype=np.uint8)
    for r, data in enumerate(rows):
        tiles = (data.permute(0, 2, 3, 1).numpy() * 255).clip(0, 255).astype(np.uint8)
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
        for i in range(m):
            y, x = r * (s * scale + gap), i * (s * scale + gap)
            canvas[y:y + s * scale, x:x + s * scale] = tiles[i]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()
