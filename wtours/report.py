"""``wtours report RUN_DIR``: (re)write a run directory's ``report.md`` from what the run left.

Reads ``config.yaml``, ``stage1/metrics.csv`` (loss, schedules, throughput), ``stage1/pictures/*.png``,
``stage1/backbone.pt`` (its meta), ``stage2/metrics.csv`` and ``eval/metrics.json`` when present,
draws ``stage1/loss.png`` (PIL, no matplotlib) and writes ``report.md`` atomically. Missing parts
are skipped, so it works on a run that is still going or was stopped; a directory with none of
``config.yaml``, ``stage1/``, ``stage2/``, ``eval/metrics.json`` is not a run and is refused (nothing
written). ``backbone.pt`` is read with ``weights_only=True`` and its checksum verified; a damaged or
unreadable one is reported as such.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from wtours.errors import UserError
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


def plot_curve(points: list[tuple[int, float]], title: str, size: tuple[int, int] = (640, 320)) -> bytes:
    """A minimal PNG line plot of ``(step, value)`` points."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(s, v) for s, v in points if math.isfinite(v)]
    left, right, top, bottom = 60, w - 15, 25, h - 30
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    d.text((left, 5), title, fill=(0, 0, 0))
    if len(pts) >= 1:
        s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
        vmin, vmax = min(v for _, v in pts), max(v for _, v in pts)
        if vmax - vmin < 1e-12:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        xy = [(left + (s - s0) / (s1 - s0) * (right - left), bottom - (v - vmin) / (vmax - vmin) * (bottom - top))
              for s, v in pts]
        if len(xy) > 1:
            d.line(xy, fill=(0, 90, 200), width=2)
        else:
            d.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=(0, 90, 200))
        d.text((5, top), f"{vmax:.3g}", fill=(0, 0, 0))
        d.text((5, bottom - 10), f"{vmin:.3g}", fill=(0, 0, 0))
        d.text((left, bottom + 8), f"step {s0}", fill=(0, 0, 0))
        d.text((right - 70, bottom + 8), f"step {s1}", fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _stage_section(run: Path, stage: str, lines: list[str]) -> None:
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
        lines += ["", f"Tracked objects (teacher) on a fixed clip, frames left to right; "
                      f"{len(pics)} pictures in `{(sdir / 'pictures').relative_to(run).as_posix()}/`:", ""]
        for p in ([pics[0], pics[-1]] if len(pics) > 1 else pics):
            lines.append(f"![{p.stem}]({p.relative_to(run).as_posix()})")
            lines.append("")
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
    if cfg_path.is_file():
        import yaml

        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
        model, data, trainer = cfg.get("model", {}), cfg.get("data", {}), cfg.get("trainer", {})
        lines += [f"- config: `config.yaml` (name `{cfg.get('name', '?')}`, seed {cfg.get('seed', '?')})",
                  f"- model: {model.get('arch', '?')}, head {model.get('out_dim', '?')} prototypes",
                  f"- clips: {data.get('frames_per_clip', '?')} frames, stride {data.get('stride', '?')} "
                  f"{data.get('stride_unit', '')}, batch {data.get('batch_size', '?')}, "
                  f"max_steps {trainer.get('max_steps')}",
                  f"- videos: {', '.join(f'`{v}`' for v in cfg.get('videos', [])) or '(none recorded)'}", ""]
    for stage in ("stage1", "stage2"):
        _stage_section(run, stage, lines)
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


def cli_main(args: Any) -> int:
    path = write_report(args.run_dir)
    print(path)
    return 0
