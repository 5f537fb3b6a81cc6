"""Callbacks of a pretraining run: a step progress bar (stderr), throughput, mask pictures.

* :class:`StepProgressBar`: one tqdm bar over *optimizer steps* (the loader is an endless clip
  stream, so epochs have no length to show), with the loss and clips/s, on stderr.
* :class:`ThroughputMonitor`: clips/s, frames/s and the fraction of wall time spent waiting for
  the loader, measured on the host between batches (no device sync of its own), logged as
  ``perf/*`` every ``log_every`` steps.
* :class:`MaskPictures`: every ``every`` steps, the teacher's tracked object masks on a fixed clip
  (the first clip the run sees, kept in the checkpoint) as ``pictures/masks_step{N:06d}.png``:
  row 1 the frames, row 2 the ``k`` objects as coloured overlays (TimeT alone: its forwarded labels,
  ``pictures/labels_step{N:06d}.png``).
* :class:`CollapseWarning`: one warning line on stderr when the logged collapse monitors
  (:mod:`wtours.objectives.collapse`) say the run has collapsed, at most once per 10 logging intervals.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar

from wtours.fsutil import atomic_open, ensure_dir

PALETTE = np.array([(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180),
                    (70, 240, 240), (245, 130, 48), (240, 50, 230)], dtype=np.float32)


class StepProgressBar(ProgressBar):
    """tqdm over optimizer steps on stderr: ``loss``, ``clips/s`` (refreshed every ``refresh`` steps)."""

    def __init__(self, refresh: int = 1, enabled: bool = True) -> None:
        super().__init__()
        self.refresh = max(1, refresh)
        self._enabled = enabled
        self.bar: Any = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        from tqdm import tqdm

        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        self.bar = tqdm(total=total, initial=trainer.global_step, desc="pretrain", unit="step",
                        file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.bar is None:
            return
        step = trainer.global_step
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
            if step % self.refresh == 0 or step == trainer.max_steps:
                m = trainer.progress_bar_metrics
                post = {}
                if "train/loss" in m:
                    post["loss"] = f"{float(m['train/loss']):.4f}"
                if "perf/clips_per_s" in m:
                    post["clips/s"] = f"{float(m['perf/clips_per_s']):.1f}"
                self.bar.set_postfix(post, refresh=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


class ThroughputMonitor(Callback):
    """Host-side clips/s, frames/s and data-wait fraction over windows of ``log_every`` steps."""

    def __init__(self, clips_per_step: int, frames_per_clip: int, log_every: int = 10) -> None:
        self.clips_per_step = clips_per_step
        self.frames_per_clip = frames_per_clip
        self.log_every = max(1, log_every)
        self._t_end: float | None = None
        self._t_window: float | None = None
        self._wait = 0.0
        self._steps = 0
        self._last_step = -1
        self.last: dict[str, float] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_end is not None:
            self._wait += now - self._t_end
        if self._t_window is None:
            self._t_window = now

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self._t_end = now
        step = trainer.global_step
        if step == self._last_step:
            return  # an accumulation micro-batch
        self._last_step = step
        self._steps += 1
        if self._steps >= self.log_every and self._t_window is not None:
            dt = max(now - self._t_window, 1e-9)
            clips = self._steps * self.clips_per_step / dt
            self.last = {"perf/clips_per_s": clips, "perf/frames_per_s": clips * self.frames_per_clip,
                         "perf/steps_per_s": self._steps / dt, "perf/data_wait": self._wait / dt}
            pl_module.log("perf/clips_per_s", clips, prog_bar=True, rank_zero_only=True)
            for k in ("perf/frames_per_s", "perf/steps_per_s", "perf/data_wait"):
                pl_module.log(k, self.last[k], rank_zero_only=True)
            self._steps, self._wait, self._t_window = 0, 0.0, now


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


class PeriodicPictures(Callback):
    """Calls ``write(trainer, pl_module)`` every ``every`` optimizer steps (0: never) and at the end of
    training; subclasses write their pictures under ``out_dir`` and list them in ``written``."""

    def __init__(self, out_dir: str | Path, every: int) -> None:
        self.out_dir = Path(out_dir)
        self.every = every
        self._last = -1
        self.written: list[Path] = []

    def write(self, trainer: Any, pl_module: Any) -> Path | None:
        raise NotImplementedError

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.every > 0:
            self.write(trainer, pl_module)


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


class CollapseWarning(Callback):
    """Warn (one line on stderr, global rank 0) when the run looks collapsed.

    Read on logging steps only (``global_step % log_every == 0``) from ``trainer.callback_metrics``,
    i.e. the values the step just logged, so it adds no device sync beyond what logging does.
    Collapsed means any of (DINO §5.3; :mod:`wtours.objectives.collapse`):

    - ``train/teacher_entropy > 0.9 * log C`` (targets close to uniform, ``C = model.out_dim``),
    - ``train/feature_std < 0.05`` (every input maps to nearly the same [CLS]),
    - ``train/prototypes_used <= 1`` (one prototype wins for every input).

    A warning needs the signal on ``patience`` consecutive logging steps (one noisy batch is not a
    collapse; a diverging run is stopped by :class:`wtours.train.guard.FiniteGuard` first). After a
    warning the next one comes ``quiet_intervals`` logging intervals later at the earliest.
    """

    def __init__(self, out_dim: int, log_every: int, report: str | Path | None = None,
                 quiet_intervals: int = 10, entropy_frac: float = 0.9, min_feature_std: float = 0.05,
                 patience: int = 2) -> None:
        self.log_c = math.log(out_dim)
        self.log_every = max(1, int(log_every))
        self.report = report
        self.quiet_steps = quiet_intervals * self.log_every
        self.entropy_frac = entropy_frac
        self.min_feature_std = min_feature_std
        self.patience = max(1, int(patience))
        self._streak = 0
        self._last_step = -1
        self._last_warned: int | None = None
        self.warnings: list[str] = []

    def check(self, metrics: dict[str, Any]) -> list[str]:
        """The collapse reasons in ``metrics`` (``{"train/<key>": value}``), as short texts."""
        def get(key: str) -> float | None:
            v = metrics.get(f"train/{key}")
            if v is None:
                return None
            v = float(v.item() if hasattr(v, "item") else v)
            return v if math.isfinite(v) else None

        reasons: list[str] = []
        loss = metrics.get("train/loss")
        if loss is not None and not math.isfinite(float(loss.item() if hasattr(loss, "item") else loss)):
            return reasons  # diverged, not collapsed: FiniteGuard stops the run and says so
        ent, std, used = get("teacher_entropy"), get("feature_std"), get("prototypes_used")
        if ent is None:
            return reasons
        if ent is not None and ent > self.entropy_frac * self.log_c:
            reasons.append(f"train/teacher_entropy {ent:.3f} > {self.entropy_frac:g}*log C = "
                           f"{self.entropy_frac * self.log_c:.3f} (targets nearly uniform)")
        if std is not None and std < self.min_feature_std:
            reasons.append(f"train/feature_std {std:.4f} < {self.min_feature_std:g} (features alike)")
        if used is not None and used <= 1:
            reasons.append(f"train/prototypes_used {used:.0f} <= 1 (one prototype for every input)")
        return reasons

    def observe(self, step: int, metrics: dict[str, Any]) -> str | None:
        """Check the metrics logged at optimizer step ``step``; returns the warning printed, if any."""
        if step % self.log_every:
            return None
        reasons = self.check(metrics)
        self._streak = self._streak + 1 if reasons else 0
        if self._streak < self.patience:
            return None
        if self._last_warned is not None and step - self._last_warned < self.quiet_steps:
            return None
        self._last_warned = step
        where = f"; see 'Collapse signals' in {self.report}" if self.report else ""
        line = f"warning: step {step}: training looks collapsed: {'; '.join(reasons)}{where}"
        self.warnings.append(line)
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)  # above a progress bar, if one is shown
        return line

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return  # an accumulation micro-batch, or another rank
        self._last_step = step
        self.observe(step, trainer.callback_metrics)
