"""What the user sees: the summary table beside the published numbers, the per-sequence CSV,
and PNG / GIF overlays of the clip-wise (C) clusters, recoloured with the Hungarian mapping so
that a cluster has its matched ground-truth label's colour (DAVIS palette)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from wtours.fsutil import atomic_open

# mIoU % (F, C, D) from the TimeT ECCV-2024 talk slides (../shared/reference/timet.md §3).
REFERENCE = {
    "davis": {"TimeT": (53.7, 53.0, 20.5), "DINO": (30.2, 31.0, 1.6), "Leopart": (30.3, 30.2, 16.5)},
    "ytvos": {"TimeT": (52.5, 51.3, 13.3), "DINO": (39.1, 37.9, 1.9), "Leopart": (39.2, 37.9, 11.7)},
}


def scores_of(metrics: dict, ks) -> dict[str, float]:
    """The scores an evaluation is compared by: F, C, D and ``K=<k>`` (overclustering mIoU) for each k of ``ks``."""
    out = {k: float(metrics[k]) for k in ("F", "C", "D")}
    for k in ks:
        out[f"K={k}"] = float(metrics["overclustering"][str(k)]["miou"])
    return out


def palette() -> np.ndarray:
    """The DAVIS / PASCAL VOC colour map [256, 3] uint8 (label 0 black)."""
    from wtours.video.synth import davis_palette

    return np.asarray(davis_palette(), dtype=np.uint8).reshape(256, 3)


def _fmt(m: dict, key: str) -> str:
    v = m.get(key)
    if v is None or v != v:
        return "-"
    sd = m.get(f"{key}_std")
    return f"{v:.1f}" + (f" ±{sd:.1f}" if sd else "")


def summary_table(metrics: dict) -> str:
    """Plain-text table: this run's F / C / D beside the reference numbers for the dataset."""
    ds = metrics["settings"]["dataset"]
    enc = metrics["encoder"]
    rows = [("", "F", "C", "D"), ("this run", *(_fmt(metrics, k) for k in ("F", "C", "D")))]
    ref = REFERENCE.get("davis" if ds == "synth" else ds, {})
    tag = " (DAVIS-17, paper)" if ds == "synth" else " (paper)"
    rows += [(name + tag, *(f"{v:.1f}" for v in vals)) for name, vals in ref.items()]
    w0 = max(len(r[0]) for r in rows) + 2
    w = max(len(c) for r in rows for c in r[1:]) + 2
    lines = [
        f"encoder {enc.get('spec')} ({enc.get('arch')}), dataset {ds}: {metrics['n_sequences']} sequences, "
        f"{metrics['n_frames']} frames (mIoU %)",
        *("".join([r[0].ljust(w0), *(c.rjust(w) for c in r[1:])]) for r in rows),
    ]
    over = metrics.get("overclustering") or {}
    if over:
        parts = [f"K={k}: {v['miou']:.1f}" + (f" ±{v['miou_std']:.1f}" if v.get("miou_std") else "")
                 for k, v in over.items()]
        lines.append("overclustering (dataset-wise, majority): " + ", ".join(parts))
    lines.append(f"total {metrics['timing']['total']:.1f} s on {metrics['settings']['device']}")
    return "\n".join(lines)


def write_csv(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    cols = ["sequence", "frames", "labels", "F", "C", "D"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "labels": " ".join(map(str, r["labels"])),
                    **{k: f"{r[k]:.2f}" for k in ("F", "C", "D")}})
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())


OVERLAY_HEIGHT = 180  # px: the height of every panel of the overlay sheets
OVERLAY_GAP = 4  # px of white between the columns and between the rows of a sheet


def overlay_parts(sheet: np.ndarray, row: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split one row of an overlay sheet (:func:`write_overlays`' PNG as an ``[H, W, 3]`` array) into its
    ``(frame, ground truth, clusters)`` panels."""
    y = row * (OVERLAY_HEIGHT + OVERLAY_GAP)
    strip = sheet[y:y + OVERLAY_HEIGHT]
    w = (strip.shape[1] - 2 * OVERLAY_GAP) // 3
    return (strip[:, :w], strip[:, w + OVERLAY_GAP:2 * w + OVERLAY_GAP],
            strip[:, 2 * (w + OVERLAY_GAP):2 * (w + OVERLAY_GAP) + w])


def _blend(img: np.ndarray, lab: np.ndarray, pal: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    col = pal[lab].astype(np.float32)
    fg = (lab != 0)[..., None] & (lab != 255)[..., None]
    out = np.where(fg, (1 - alpha) * img + alpha * col, 0.6 * img)
    return out.clip(0, 255).astype(np.uint8)


def overlay_frames(frames: list[Path], gt: np.ndarray, pred: np.ndarray, height: int = OVERLAY_HEIGHT
                   ) -> list[np.ndarray]:
    """One panel per frame: [frame | ground truth | clusters], at the frame's own aspect ratio."""
    from PIL import Image

    pal = palette()
    panels = []
    for path, g, p in zip(frames, gt, pred):
        with Image.open(path) as im:
            w = max(1, round(im.width * height / im.height))
            img = np.asarray(im.convert("RGB").resize((w, height), Image.BILINEAR)).astype(np.float32)
        g2 = np.asarray(Image.fromarray(g).resize((w, height), Image.NEAREST))
        p2 = np.asarray(Image.fromarray(p).resize((w, height), Image.NEAREST))
        gap = np.full((height, OVERLAY_GAP, 3), 255, np.uint8)
        panels.append(np.concatenate([img.astype(np.uint8), gap, _blend(img, g2, pal), gap, _blend(img, p2, pal)], 1))
    return panels


def write_overlays(out_dir: Path, name: str, frames: list[Path], gt: np.ndarray, pred: np.ndarray,
                   gif: bool = True, rows: int = 4) -> list[Path]:
    """``<name>.png`` (up to ``rows`` frames) and ``<name>.gif`` (all frames) in ``out_dir``."""
    from PIL import Image

    panels = overlay_frames(frames, gt, pred)
    pick = sorted({int(round(v)) for v in np.linspace(0, len(panels) - 1, min(rows, len(panels)))})
    sheet = np.concatenate([np.concatenate([panels[i], np.full((OVERLAY_GAP, panels[i].shape[1], 3), 255, np.uint8)])
                            for i in pick])
    written = []
    png = out_dir / f"{name}.png"
    with atomic_open(png, "wb") as f:
        Image.fromarray(sheet).save(f, format="PNG", compress_level=3)
    written.append(png)
    if gif and len(panels) > 1:
        fast = Image.Quantize.FASTOCTREE  # PIL's default GIF quantizer takes ~0.3 s a frame
        ims = [Image.fromarray(p).quantize(colors=255, method=fast) for p in panels]
        g = out_dir / f"{name}.gif"
        with atomic_open(g, "wb") as f:
            ims[0].save(f, format="GIF", save_all=True, append_images=ims[1:], duration=250, loop=0)
        written.append(g)
    return written
