"""The report of a stage's run directory: (re)write its ``report.md`` from what the run left.

Reads ``config.yaml``, ``stage1/metrics.csv`` (loss, schedules, throughput), ``stage1/pictures/*.png``,
``stage1/backbone.pt`` (its meta), ``stage2/metrics.csv`` and ``eval/metrics.json`` when present,
draws ``stage1/loss.png`` and ``stage1/collapse.png`` (the collapse signals, one panel each;
:mod:`wtours.figures`) and writes ``report.md`` atomically. Missing parts are skipped, so it works on a run that
is still going or was stopped; a directory with none of ``config.yaml``, ``stage1/``, ``stage2/``,
``eval/metrics.json`` is not a run and is refused (nothing written). ``backbone.pt`` is read with
``weights_only=True`` and its checksum verified; a damaged or unreadable one is reported as such.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from wtours.errors import UserError
from wtours.figures import plot_curve, plot_panels
from wtours.fsutil import atomic_open, write_text


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` -> ``{column: [(step, value), ...]}`` (empty cells skipped)."""
    out: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(float(row.get("step") or 0))
            except ValueError:
                continue
            for k, v in row.items():
                if k in ("step", "epoch") or v in (None, ""):
                    continue
                try:
                    out.setdefault(k, []).append((step, float(v)))
                except ValueError:
                    pass
    for v in out.values():
        v.sort()
    return out


#: collapse monitors logged by the stage-1 step (``train/<key>``), with how they move when a run collapses
COLLAPSE_SIGNALS: tuple[tuple[str, str], ...] = (
    ("train/teacher_entropy", "teacher target entropy, nats (rises to log C: uniform targets)"),
    ("train/teacher_batch_entropy", "entropy of the batch-mean target (falls to the above: rows alike)"),
    ("train/kl", "student-teacher KL (-> 0 when there is nothing left to learn)"),
    ("train/prototypes_used", "distinct argmax prototypes in the batch (-> 1)"),
    ("train/center_norm", "norm of the DINO centre (grows when one direction dominates)"),
    ("train/feature_std", "spread of the teacher [CLS] over the batch (~1 healthy, -> 0 collapsed)"),
    ("train/mask_coverage", "fraction of patches inside tracked-object masks"),
    ("train/koleo", "KoLeo regulariser (when loss.koleo_weight > 0)"),
    ("train/teacher_logit_spread", "std over the batch of the teacher logits / tau_t (-> 0: every input alike)"),
    ("train/teacher_logit_range", "per-row max - min of the teacher logits / tau_t (-> 0: flat targets)"),
    ("train/bottleneck_rank", "effective rank of the teacher head's bottleneck over the batch (-> 1)"),
    ("train/teacher_head_g", "mean g of the teacher's prototypes layer (-> 0 flattens every target)"),
)


def _collapse_section(run: Path, sdir: Path, m: dict[str, list[tuple[int, float]]], out_dim: int | None,
                      lines: list[str]) -> None:
    """Table of first/last/min/max per collapse signal and ``<stage>/collapse.png`` (one panel each)."""
    present = [(k, label) for k, label in COLLAPSE_SIGNALS if m.get(k)]
    if not present:
        return
    log_c = math.log(out_dim) if isinstance(out_dim, int) and out_dim > 1 else None
    lines += ["### Collapse signals", ""]
    if log_c is not None:
        lines.append(f"Uniform targets have entropy log C = {log_c:.3f} nats (C = model.out_dim = {out_dim}); "
                     f"training warns when the teacher entropy exceeds 0.9 log C = {0.9 * log_c:.3f}, the "
                     "feature std falls below 0.05 or a single prototype is used.")
        lines.append("")
    lines += ["| signal | first | last | min | max | meaning |", "|---|---|---|---|---|---|"]
    panels = []
    for key, label in present:
        pts = m[key]
        vals = [v for _, v in pts if math.isfinite(v)] or [float("nan")]
        lines.append(f"| `{key}` | {pts[0][1]:.4g} | {pts[-1][1]:.4g} | {min(vals):.4g} | {max(vals):.4g} | {label} |")
        hline = (log_c, "log C") if key == "train/teacher_entropy" and log_c is not None else None
        panels.append((key, pts, hline))
    png = sdir / "collapse.png"
    with atomic_open(png, "wb") as f:
        f.write(plot_panels(panels))
    lines += ["", f"![collapse signals]({png.relative_to(run).as_posix()})", ""]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _stage_section(run: Path, stage: str, lines: list[str], out_dim: int | None = None) -> None:
    sdir = run / stage
    m = read_metrics(sdir / "metrics.csv")
    if not m and not sdir.is_dir():
        return
    lines += [f"## {stage}", ""]
    loss_key = next((k for k in ("train/loss", "loss", "train_loss") if k in m), None)
    if loss_key:
        pts = m[loss_key]
        lines.append(f"- loss: first {pts[0][1]:.4f} (step {pts[0][0]}) -> last {pts[-1][1]:.4f} "
                     f"(step {pts[-1][0]}), min {min(v for _, v in pts):.4f}")
        png = sdir / "loss.png"
        with atomic_open(png, "wb") as f:
            f.write(plot_curve(pts, f"{stage} {loss_key}"))
        lines.append(f"- ![loss]({png.relative_to(run).as_posix()})")
    for key, label in (("perf/clips_per_s", "clips/s"), ("perf/frames_per_s", "frames/s"),
                       ("perf/data_wait", "data-wait fraction"), ("train/mask_coverage", "mask coverage"),
                       ("train/teacher_entropy", "teacher target entropy (nats; log C = uniform collapse)"),
                       ("train/kl", "student-teacher KL (loss minus teacher entropy)")):
        if key in m:
            vals = [v for _, v in m[key]]
            lines.append(f"- {label}: first {vals[0]:.4g}, last {vals[-1]:.4g}, mean {sum(vals) / len(vals):.4g}")
    bb = sdir / "backbone.pt"
    collapse: list[str] = []
    _collapse_section(run, sdir, m, out_dim, collapse)
    if bb.is_file():
        meta: dict = {}
        problem = ""
        try:
            from wtours.integrity import CHECKSUM_KEY, load_verified

            obj, _ = load_verified(bb)
            meta = {k: v for k, v in (obj.get("meta") or {}).items() if k != CHECKSUM_KEY}
        except UserError as e:  # a report never fails on a bad file: it says so
            problem = str(e).removeprefix(f"{bb}: ")
        except Exception as e:  # noqa: BLE001
            problem = f"unreadable ({type(e).__name__})"
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in meta.items() if k != "videos")
        lines.append(f"- backbone: `{bb.relative_to(run).as_posix()}`"
                     + (f" ({details})" if details else "") + (f" **{problem}**" if problem else ""))
    pics = sorted((sdir / "pictures").glob("*.png")) if (sdir / "pictures").is_dir() else []
    if pics:
        what = ("Student patch features on fixed images (row 2: first 3 PCA components as RGB)" if stage == "stage2"
                else "Tracked objects (teacher) on a fixed clip, frames left to right")
        lines += ["", f"{what}; {len(pics)} pictures in `{(sdir / 'pictures').relative_to(run).as_posix()}/`:", ""]
        for p in ([pics[0], pics[-1]] if len(pics) > 1 else pics):
            lines.append(f"![{p.stem}]({p.relative_to(run).as_posix()})")
            lines.append("")
    if collapse:
        lines += ["", *collapse]
    lines.append("")


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.md``; returns its path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError("run directory not found" if not run.exists() else "not a directory", path=run)
    markers = (run / "config.yaml", run / "stage1", run / "stage2", run / "eval" / "metrics.json")
    if not any(p.exists() for p in markers):
        raise UserError("not a run directory (no config.yaml, stage1/, stage2/ or eval/metrics.json): "
                        "nothing to report", path=run)
    lines = [f"# Run report: {run.name}", ""]
    cfg_path = run / "config.yaml"
    out_dim = None
    if cfg_path.is_file():
        import yaml

        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
        model, data, trainer = cfg.get("model", {}), cfg.get("data", {}), cfg.get("trainer", {})
        out_dim = model.get("out_dim") if isinstance(model.get("out_dim"), int) else None
        lines += [f"- config: `config.yaml` (name `{cfg.get('name', '?')}`, seed {cfg.get('seed', '?')})",
                  f"- model: {model.get('arch', '?')}, head {model.get('out_dim', '?')} prototypes",
                  f"- clips: {data.get('frames_per_clip', '?')} frames, stride {data.get('stride', '?')} "
                  f"{data.get('stride_unit', '')}, batch {data.get('batch_size', '?')}, "
                  f"max_steps {trainer.get('max_steps')}",
                  f"- videos: {', '.join(f'`{v}`' for v in cfg.get('videos', [])) or '(none recorded)'}", ""]
    for stage in ("stage1", "stage2"):
        _stage_section(run, stage, lines, out_dim)
    ev = run / "eval" / "metrics.json"
    if ev.is_file():
        try:
            data = json.loads(ev.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            lines += ["## eval", "", "| metric | value |", "|---|---|"]
            flat: dict[str, Any] = {}

            def walk(d: Any, prefix: str = "") -> None:
                if isinstance(d, dict):
                    for k, v in d.items():
                        walk(v, f"{prefix}{k}.")
                elif isinstance(d, (int, float, str)):
                    flat[prefix.rstrip(".")] = d

            walk(data)
            for k, v in list(flat.items())[:60]:
                lines.append(f"| {k} | {_fmt(v)} |")
            lines.append("")
    return write_text(run / "report.md", "\n".join(lines).rstrip() + "\n")
