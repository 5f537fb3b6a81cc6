"""Every figure wtours draws, with matplotlib (Agg backend, PNG bytes): training curves, the collapse panels,
tracked-object masks with a legend, NeCo's PCA pictures, and the side-by-side cluster overlays of a report.

Curves show the raw logged values faint and an exponential moving average over them (the trend), on labelled
axes (x: optimizer step; y: the quantity and its unit) with a grid; a reference line (``hline``, e.g.
``log C`` for the teacher entropy) is dashed and named in the legend.

Example::

    from wtours.figures import plot_curve
    png = plot_curve([(0, 4.2), (10, 3.9), (20, 3.1)], "stage1 train/loss")
    Path("loss.png").write_bytes(png)
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

import numpy as np

Points = Sequence[tuple[int, float]]
Panel = tuple[str, Points, "tuple[float, str] | None"]

#: y-axis labels of the logged keys (quantity, unit); others get the key itself
Y_LABELS = {
    "loss": "loss (nats)", "train/loss": "loss (nats)",
    "train/teacher_entropy": "entropy (nats)", "train/teacher_batch_entropy": "entropy (nats)",
    "train/kl": "KL (nats)", "train/prototypes_used": "prototypes", "train/center_norm": "L2 norm",
    "train/feature_std": "std", "train/mask_coverage": "fraction of patches", "train/koleo": "KoLeo",
    "train/teacher_logit_spread": "std of logits / tau", "train/teacher_logit_range": "logits / tau",
    "train/bottleneck_rank": "effective rank", "train/teacher_head_g": "g",
    "perf/clips_per_s": "clips / s", "perf/frames_per_s": "frames / s", "perf/data_wait": "fraction of time",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, dpi: int = 100) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def smooth(values: Sequence[float], span: int | None = None) -> np.ndarray:
    """Exponential moving average (bias-corrected, as TensorBoard's smoothing) over ``span`` points (default:
    a fifteenth of the curve, at least 3); non-finite values are carried over from the last finite average."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    span = span or max(3, v.size // 15)
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(v)
    avg, weight = 0.0, 0.0
    for i, x in enumerate(v):  # a plotted curve: thousands of points at most
        if math.isfinite(x):
            avg = (1.0 - alpha) * avg + alpha * x
            weight = (1.0 - alpha) * weight + alpha
        out[i] = avg / weight if weight > 0 else math.nan
    return out


def _curve(ax: Any, points: Points, title: str, hline: tuple[float, str] | None = None) -> None:
    pts = [(s, v) for s, v in points if math.isfinite(v)]
    key = title.split(" ")[-1].split(": ")[-1]
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(Y_LABELS.get(key, key))
    ax.grid(alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=ax.transAxes)
        return
    xs = [s for s, _ in pts]
    ys = [v for _, v in pts]
    if len(pts) > 1:
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=1, label="logged")
        if len(pts) >= 8:
            ax.plot(xs, smooth(ys), color="tab:blue", lw=2, label="smoothed (EMA)")
    else:
        ax.plot(xs, ys, "o", color="tab:blue", label="logged")
    if hline is not None and math.isfinite(hline[0]):
        ax.axhline(hline[0], color="tab:red", ls="--", lw=1, label=hline[1])
    if len(pts) > 1 or hline is not None:
        ax.legend(fontsize=7, loc="best")


def plot_curve(points: Points, title: str, size: tuple[int, int] = (640, 320),
               hline: tuple[float, str] | None = None) -> bytes:
    """One curve of ``(step, value)`` points (``size`` in pixels at 100 dpi) -> PNG bytes."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(size[0] / 100, size[1] / 100))
    _curve(ax, points, title, hline)
    return _png(fig)


def plot_panels(panels: Sequence[Panel], cols: int = 2, panel_size: tuple[int, int] = (400, 240)) -> bytes:
    """Small multiples: one curve per ``(title, points, hline)``, ``cols`` a row -> PNG bytes."""
    plt = _plt()
    cols = max(1, min(cols, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_size[0] / 100, rows * panel_size[1] / 100),
                             squeeze=False)
    for ax, (title, pts, hline) in zip(axes.ravel(), panels):
        _curve(ax, pts, title, hline)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def image_grid(rows: Sequence[Sequence[np.ndarray]], col_titles: Sequence[str] = (),
               row_titles: Sequence[str] = (), legend: Sequence[tuple[str, Sequence[float]]] = (),
               title: str = "", cell: float = 2.0) -> bytes:
    """A grid of RGB images (``rows[r][c]``: ``[H, W, 3]`` uint8 or float in [0, 1]) with column headers, row
    labels and an optional legend of ``(label, rgb in [0, 1])`` patches -> PNG bytes."""
    plt = _plt()
    from matplotlib.patches import Patch

    n_rows = len(rows)
    n_cols = max(len(r) for r in rows) if rows else 1
    h, w = rows[0][0].shape[:2] if rows and rows[0] else (1, 1)
    aspect = w / max(h, 1)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * cell * aspect, n_rows * cell + 0.6), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(row):
                ax.imshow(row[c], interpolation="nearest")
            if r == 0 and c < len(col_titles):
                ax.set_title(col_titles[c], fontsize=9)
            if c == 0 and r < len(row_titles):
                ax.set_ylabel(row_titles[r], fontsize=8)
    if legend:
        fig.legend(handles=[Patch(color=tuple(rgb), label=lab) for lab, rgb in legend], loc="lower center",
                   ncol=min(len(legend), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if legend else 0, 1, 1))
    return _png(fig)
