"""The per-stage metrics tables of a pipeline run, and the published numbers shown beside them.

An eval stage's ``metrics.json`` (:func:`stage_doc`) holds, per dataset, the scores of the stage's input
backbone and of the ``random:`` baseline of the same arch: F, C, D (mIoU %) and ``K=<k>`` (overclustering).
:func:`text_table` prints them; :func:`summary_rows` joins every eval stage of a run into one table
(random / after the video stage / after NeCo ...).

The published numbers are copied from ``../shared/reference/`` (TimeT's talk slides for video clustering
F / C / D, NeCo's Table 1a for Pascal VOC clustering). They are **published, not measured here**, and
come from other protocols, models and data than a tiny CPU run: a frame of reference, not a target.
"""

from __future__ import annotations

from typing import Any, Sequence

from wtours.eval.report import REFERENCE

PUBLISHED_NOTE = "published, not measured here"
# TimeT ECCV-2024 talk slides (shared/reference/timet.md §3): ViT-S/16, mIoU % (F, C, D) -> wtours.eval.report
PUBLISHED_FCD_SOURCE = "TimeT authors' results slides (Salehi et al., ICCV 2023; shown at ECCV 2024); ViT-S/16, mIoU %"
# NeCo (ICLR 2025) Table 1a (shared/reference/neco.md §3.4): Pascal VOC clustering mIoU %, ViT-S
PUBLISHED_NECO_SOURCE = "NeCo (Pariza et al., ICLR 2025) Table 1a; Pascal VOC clustering, ViT-S, mIoU %"
PUBLISHED_NECO_VOC: dict[str, tuple[float, float, float]] = {  # K = GT, 300, 500
    "DINO": (4.3, 13.9, 17.3),
    "TimeT": (12.2, 43.6, 46.2),
    "NeCo": (17.8, 69.4, 72.6),
}
# DoRA publishes no clustering F / C / D (its DAVIS numbers are J&F label propagation): shared/reference/dora.md
DORA_NOTE = ("DoRA publishes no DAVIS / YouTube-VOS clustering scores (its DAVIS-2017 numbers are J&F label "
             "propagation, another protocol: Venkataramanan et al., ICLR 2024)")


def stage_doc(stage: str, input_stage: str, arch: str, metric_names: Sequence[str],
              datasets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The ``metrics.json`` of an eval stage; ``datasets[name] = {"root", "label", "encoders": {"random":
    {"spec", "scores", "metrics"}, "trained": {...}}}``."""
    return {"stage": stage, "input": input_stage, "arch": arch, "unit": "mIoU %",
            "metric_names": list(metric_names), "datasets": datasets}


def _cell(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def stage_rows(doc: dict[str, Any]) -> list[tuple[str, str, list[float | None]]]:
    """``(dataset label, encoder label, scores in metric_names order)`` for one eval stage."""
    rows = []
    names = doc["metric_names"]
    for ds in doc["datasets"].values():
        for enc, label in (("random", f"random init ({doc['arch']})"), ("trained", f"after {doc['input']}")):
            scores = ds["encoders"][enc]["scores"]
            rows.append((ds["label"], label, [scores.get(n) for n in names]))
    return rows


def summary_rows(docs: Sequence[dict[str, Any]]) -> tuple[list[str], list[tuple[str, str, list[float | None]]]]:
    """Every eval stage of a run in one table: per dataset the random baseline once, then each evaluated
    stage in run order -> ``(metric names, rows)``."""
    names: list[str] = []
    for d in docs:
        names += [n for n in d["metric_names"] if n not in names]
    seen: set[tuple[str, str]] = set()
    rows = []
    for d in docs:
        for ds in d["datasets"].values():
            for enc, label in (("random", f"random init ({d['arch']})"), ("trained", f"after {d['input']}")):
                e = ds["encoders"][enc]
                key = (ds["label"], e["spec"] if enc == "random" else label)
                if key in seen:
                    continue
                seen.add(key)
                rows.append((ds["label"], label, [e["scores"].get(n) for n in names]))
    order = {lab: i for i, lab in enumerate(dict.fromkeys(r[0] for r in rows))}
    rows.sort(key=lambda r: order[r[0]])  # stable: within a dataset, run order
    return names, rows


def text_table(names: Sequence[str], rows: Sequence[tuple[str, str, list[float | None]]]) -> str:
    """Aligned plain-text table (what the command prints)."""
    head = ["dataset", "encoder", *names]
    body = [[r[0], r[1], *(_cell(v) for v in r[2])] for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])  # noqa: E731
                                  for i, c in enumerate(cells))
    return "\n".join([fmt(head), *(fmt(b) for b in body)])


def markdown_rows(names: Sequence[str], rows: Sequence[tuple[str, str, list[float | None]]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the same table, for the report."""
    return ["dataset", "encoder", *names], [[r[0], r[1], *(_cell(v) for v in r[2])] for r in rows]


def published_tables() -> list[tuple[str, list[str], list[list[str]]]]:
    """``(caption, header, rows)`` of the published numbers (marked as such)."""
    fcd_rows = []
    for ds, methods in REFERENCE.items():
        for name, vals in methods.items():
            fcd_rows.append([ds, name, *(f"{v:.1f}" for v in vals)])
    voc_rows = [[name, *(f"{v:.1f}" for v in vals)] for name, vals in PUBLISHED_NECO_VOC.items()]
    return [
        (f"Video clustering, {PUBLISHED_NOTE}: {PUBLISHED_FCD_SOURCE}",
         ["dataset", "method", "F", "C", "D"], fcd_rows),
        (f"Image clustering, {PUBLISHED_NOTE}: {PUBLISHED_NECO_SOURCE}",
         ["method", "K=GT", "K=300", "K=500"], voc_rows),
    ]
