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
    """PNG bytes (matplotlib): crops ``[M, 3, S, S]`` in a row and below them their patch features' first 3
    PCA components as RGB (``pca [M, 3, g, g]``, bilinearly upsampled to the crop), with headers."""
    import torch.nn.functional as F

    from wtours.figures import image_grid

    s = crops.shape[-1]
    up = F.interpolate(pca.float().cpu(), size=(s, s), mode="bilinear", align_corners=False).clamp(0, 1)
    rows = [list(t.permute(0, 2, 3, 1).numpy().clip(0, 1)) for t in (crops.float().cpu(), up)]
    g = pca.shape[-1]
    return image_grid(rows, col_titles=[f"image {i}" for i in range(crops.shape[0])],
                      row_titles=["crop", f"PCA of {g}x{g} patches (RGB)"], cell=min_size / 64)
