"""The report of a pipeline run: ``report.md`` and a self-contained ``report.html`` (images embedded).

Both are rendered from one list of blocks (headings, paragraphs, tables, images), built from what the
run directory holds: ``pipeline.yaml``, each stage's ``status.json`` (state, time), the training stages'
``metrics.csv`` (loss curves, drawn to ``<stage>/loss.png``) and pictures (stage 1: tracked-object masks;
NeCo: PCA of the patch features), the eval stages' ``metrics.json`` (tables) and cluster overlays (the
same frames for the random baseline and after each training stage: before / after NeCo), and the
published numbers of :mod:`wtours.report.tables` (marked as not measured here). Missing parts are
skipped, so a stopped run is reported as far as it got.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import yaml

from wtours.fsutil import atomic_open, write_text
from wtours.rundir import STAGE_SUBDIR, read_status
from wtours.report.stage import plot_curve, read_metrics
from wtours.report.tables import DORA_NOTE, markdown_rows, published_tables, stage_rows, summary_rows

Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", path, caption) | ("pre", text)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _secs(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _loss_picture(out: Path, stage: str, sub: Path) -> Path | None:
    pts = read_metrics(sub / "metrics.csv").get("train/loss")
    if not pts:
        return None
    png = out / stage / "loss.png"
    with atomic_open(png, "wb") as f:
        f.write(plot_curve(pts, f"{stage}: train/loss"))
    return png


def _pictures(sub: Path) -> list[Path]:
    pics = sorted((sub / "pictures").glob("*.png")) if (sub / "pictures").is_dir() else []
    return [pics[0], pics[-1]] if len(pics) > 1 else pics


def build_blocks(out: Path) -> list[Block]:
    """The report's content (see the module docstring)."""
    try:
        spec = yaml.safe_load((out / "pipeline.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        spec = {}
    stages: dict[str, dict] = spec.get("stages") or {}
    statuses = {name: read_status(out / name) for name in stages}
    data = spec.get("data") or {}
    blocks: list[Block] = [("h", 1, f"Pipeline report: {spec.get('name', out.name)}")]
    if spec.get("description"):
        blocks.append(("p", str(spec["description"]).strip()))
    blocks.append(("p", f"Command: `{spec.get('command') or '?'}`. Training videos: "
                        f"{', '.join(data.get('videos') or []) or '?'}; NeCo images: {data.get('neco_images', '?')}; "
                        f"evaluation: {', '.join(e['label'] + ' (' + e['root'] + ')' for e in data.get('eval') or [])}."))
    # the pipeline and the time of each stage
    rows = []
    total = 0.0
    for name, s in stages.items():
        st = statuses[name]
        total += float(st.get("seconds") or 0.0)
        over = " ".join(s.get("set") or [])
        rows.append([name, s["kind"], s["config"] + (f" ({over})" if over else ""), s.get("input") or "-",
                     st.get("state", "pending"), _secs(st.get("seconds")), st.get("backbone") or "-"])
    blocks += [("h", 2, "Pipeline"),
               ("table", ["stage", "kind", "config (overrides)", "input", "state", "time", "backbone"], rows),
               ("p", f"Total time of the stages: {_secs(total)}.")]
    # metrics
    docs = [d for name, s in stages.items() if s["kind"] == "eval" and statuses[name].get("state") == "done"
            for d in [_read_json(out / name / "metrics.json")] if isinstance(d, dict)]
    if docs:
        names, summary = summary_rows(docs)
        blocks += [("h", 2, "Results (measured here)"),
                   ("p", "Unsupervised clustering mIoU % (F frame-wise, C clip-wise, D dataset-wise; K=<k>: "
                         "dataset-wise overclustering, majority matching); where the data allows, the dense "
                         "instruments: J&F of label propagation (DAVIS layout), in-context retrieval and linear-probe "
                         "mIoU % (category-labelled YTVOS layout); each backbone beside the random "
                         "initialisation of the same architecture."),
                   ("table", *markdown_rows(names, summary))]
        for d in docs:
            blocks += [("h", 3, f"{d['stage']}: after {d['input']}"), ("table", *markdown_rows(d["metric_names"],
                                                                                              stage_rows(d)))]
    blocks += [("h", 2, "Published numbers (not measured here)"),
               ("p", "Copied from the papers' tables for reference: other models (ViT-S/16), data and scale than "
                     "this run; not comparable to a toy CPU run. " + DORA_NOTE + ".")]
    for caption, head, prow in published_tables():
        blocks += [("p", caption), ("table", head, prow)]
    # training stages: loss curves and pictures
    trained = [(n, s) for n, s in stages.items() if s["kind"] in STAGE_SUBDIR]
    if trained:
        blocks.append(("h", 2, "Training stages"))
    for name, s in trained:
        sub = out / name / STAGE_SUBDIR[s["kind"]]
        blocks.append(("h", 3, f"{name} ({s['kind']}, {_secs(statuses[name].get('seconds'))})"))
        loss = _loss_picture(out, name, sub)
        if loss:
            blocks.append(("img", loss, f"{name}: training loss"))
        what = ("tracked-object masks of the teacher on a fixed clip (first and last picture)" if s["kind"] == "video"
                else "student patch features on fixed images, first 3 PCA components (first and last picture)")
        for p in _pictures(sub):
            blocks.append(("img", p, f"{name}: {what}: {p.stem}"))
        if (sub / "collapse.png").is_file():
            blocks.append(("img", sub / "collapse.png", f"{name}: collapse signals (teacher entropy against log C, "
                                                         "student-teacher KL, prototypes in use, feature spread, ...)"))
    # cluster overlays: the same frames for random and after each training stage, side by side
    if docs:
        blocks += [("h", 2, "Cluster overlays"),
                   ("p", "One row per sequence (its first drawn frame): the frame, its ground truth, and the clip-wise "
                         "clusters (Hungarian-matched to the ground truth's colours) of the random initialisation and "
                         "after each evaluated stage.")]
        for key, ds in docs[0]["datasets"].items():
            png = _overlay_grid(out, key, ds, docs)
            if png is not None:
                blocks.append(("img", png, f"{ds['label']}: frame | ground truth | random init | "
                                           + " | ".join(f"after {d['input']}" for d in docs if key in d["datasets"])))
    return blocks


def _overlay_grid(out: Path, key: str, ds: dict, docs: list[dict], max_rows: int = 3) -> Path | None:
    """``<out>/overlays_<key>.png``: per sequence (up to ``max_rows``, those drawn for every encoder) the
    frame, ground truth, random init's and each stage's clusters, with column headers (matplotlib)."""
    import numpy as np
    from PIL import Image

    from wtours.eval.report import overlay_parts
    from wtours.figures import image_grid

    columns = [("random init", ds["encoders"]["random"]["overlays"])]
    columns += [(f"after {d['input']}", d["datasets"][key]["encoders"]["trained"]["overlays"])
                for d in docs if key in d["datasets"]]
    names = [n for n in (Path(p).name for p in columns[0][1])
             if all(n in {Path(q).name for q in pics} for _, pics in columns)][:max_rows]
    if not names:
        return None
    rows, labels = [], []
    for name in names:
        sheets = [np.asarray(Image.open(out / next(p for p in pics if Path(p).name == name)).convert("RGB"))
                  for _, pics in columns]
        frame, gt, _ = overlay_parts(sheets[0])
        rows.append([frame, gt, *(overlay_parts(sh)[2] for sh in sheets)])
        labels.append(Path(name).stem)
    png = out / f"overlays_{key}.png"
    with atomic_open(png, "wb") as f:
        f.write(image_grid(rows, col_titles=["frame", "ground truth", *(label for label, _ in columns)],
                           row_titles=labels, cell=1.6))
    return png
    return blocks


def render_markdown(blocks: list[Block], out: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "pre":
            lines += ["```", b[1], "```", ""]
        elif b[0] == "table":
            head, rows = b[1], b[2]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
            lines.append("")
        elif b[0] == "img":
            lines += [f"![{b[2]}]({Path(b[1]).relative_to(out).as_posix()})", "", f"*{b[2]}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    parts = ["<!doctype html>", "<html><head><meta charset=\"utf-8\">", f"<title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:2px 8px;"
             "text-align:right}td:first-child,td:nth-child(2),th{text-align:left}img{max-width:100%}"
             "figure{margin:1em 0}figcaption{font-size:90%;color:#444}</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "pre":
            parts.append(f"<pre>{e(b[1])}</pre>")
        elif b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in b[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2]]
            parts.append("</table>")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt=\"{e(b[2])}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{e(b[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_reports(out: str | Path) -> list[Path]:
    """Write ``<out>/report.md`` and ``<out>/report.html`` -> their paths."""
    out = Path(out)
    blocks = build_blocks(out)
    title = next((b[2] for b in blocks if b[0] == "h"), "Pipeline report")
    md = write_text(out / "report.md", render_markdown(blocks, out))
    page = write_text(out / "report.html", render_html(blocks, title))
    return [md, page]
