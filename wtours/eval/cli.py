"""``wtours eval clustering``: unsupervised video segmentation by clustering (F / C / D).

Writes into ``--out`` (default ``runs/eval/<dataset>``):

- ``metrics.json``: ``F``, ``C``, ``D`` (mIoU %, mean over repeats, ``*_std`` when repeated),
  ``overclustering``, ``per_sequence``, ``settings`` (every protocol choice), ``encoder``
  (checkpoint identity and sha256), ``timing`` (seconds per stage);
- ``per_sequence.csv``, ``frames.json`` (the exact frames used), ``config.yaml``;
- ``overlays/<sequence>.{png,gif}``: frame | ground truth | clip-wise clusters.

:func:`evaluate_clustering` is the same thing as a Python function.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from wtours.config import load_config, to_dict, to_yaml
from wtours.errors import ConfigError, UserError
from wtours.eval.config import EvalConfig
from wtours.eval.datasets import Dataset, read_dataset
from wtours.eval.features import extract_features
from wtours.eval.protocol import run_protocol
from wtours.eval.report import REFERENCE, summary_table, write_csv, write_overlays
from wtours.fsutil import ensure_dir, write_json, write_text

PROTOCOL_NOTES = [
    "features: last block's patch tokens after the final norm, prefix tokens dropped",
    "frames resized to input_size without keeping the aspect ratio (as the reference)",
    "k-means: k-means++ init, restarts, fit on <= max_points_per_centroid*K pixels per pool, all pixels assigned",
    "mIoU includes background; Hungarian leaves unmatched clusters to background; overclustering: majority",
    "reference bugs not reproduced: x255/drop-255 in D (label 1 lost), YTVOS in-place category remap",
]


def protocol_notes(cfg: EvalConfig) -> list[str]:
    """The run's protocol choices in words, each against the reference's (metrics.json ``settings.notes``)."""
    n = cfg.frames_per_clip
    if n == 0:
        frames = "frames: every annotated frame of each clip (reference: 4 random sorted frames)"
    elif cfg.frame_sampling == "random":
        frames = (f"frames: {n} random sorted annotated frames per clip, a new draw per repeat (seeds {cfg.seed}.."
                  f"{cfg.seed + cfg.repeats - 1}), as the reference")
    else:
        frames = f"frames: {n} evenly spaced annotated frames per clip (reference: {n} random sorted frames)"
    scope = {"clip": "per clip", "batch": f"per batch of {cfg.batch_videos} videos (as the reference)",
             "dataset": "on the whole dataset"}[cfg.pca_scope]
    pca = (f"standardise + PCA fitted {scope} for F/C"
           + ("" if cfg.pca_scope == "batch" else " (reference: per loader batch of 16 videos)") + ", per dataset for D")
    average = ("F/C: mean over every frame / clip (reference: per batch of 16 videos, then over batches)"
               if cfg.score_average == "all" else
               f"F/C: mean per batch of {cfg.batch_videos} videos, then over batches (as the reference)")
    return PROTOCOL_NOTES[:2] + [frames, pca, average] + PROTOCOL_NOTES[2:]


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda[:N]`` -> a usable device, else a one-line :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected cuda, cuda:N, cpu or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {name}: there {'is' if n == 1 else 'are'} only {n} CUDA device(s) "
                            f"(cuda:0..cuda:{n - 1})")
    return dev


def check_overcluster_k(cfg: EvalConfig, n_frames: int, patch: tuple[int, int]) -> None:
    """Refuse overclustering K values above the points of the dataset-wise pool (known from the
    dataset and the sizes, so before any feature is extracted): k-means with more clusters than
    points means nothing, and a huge K used to run for hours."""
    if cfg.cluster_at == "patch":
        h, w = cfg.input_size[0] // patch[0], cfg.input_size[1] // patch[1]
        where = f"{h}x{w} patch tokens (cluster_at=patch)"
    else:
        h, w = cfg.eval_size_dataset
        where = f"{h}x{w} pixels at eval_size_dataset"
    n = n_frames * h * w
    for k in cfg.overcluster_k:
        if k > n:
            raise UserError(f"--k {k} (overcluster_k): more clusters than the {n} points of the dataset-wise pool "
                            f"({n_frames} frames x {where}); K must be at most {n}")


def _sha256(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# eval settings that change no score (a finished evaluation is reused across them)
COSMETIC_EVAL_KEYS = ("progress", "overlays", "gif", "workers")


def eval_key(cfg_dict: dict) -> dict:
    """The part of an eval config (:func:`wtours.config.to_dict`) that decides the scores."""
    return {k: v for k, v in json.loads(json.dumps(cfg_dict)).items() if k not in COSMETIC_EVAL_KEYS}


def reusable_metrics(out_dir: str | Path, dataset: str, root: str | Path, spec: str, cfg: EvalConfig,
                     sha256: str | None = None) -> dict | None:
    """The ``metrics.json`` in ``out_dir`` when it evaluated this encoder ``spec`` (and file ``sha256``, when
    given) on this dataset and root with an eval config of the same :func:`eval_key`; else None."""
    try:
        m = json.loads((Path(out_dir) / "metrics.json").read_text())
        same = (m["encoder"]["spec"] == spec and m["settings"]["dataset"] == dataset
                and Path(m["settings"]["root"]).resolve() == Path(root).resolve()
                and eval_key(m["settings"]["config"]) == eval_key(to_dict(cfg))
                and (sha256 is None or m["encoder"].get("sha256") == sha256))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return m if same else None


def _aggregate(runs: list[dict]) -> dict:
    """Mean (and std over repeats) of the scores; per-sequence rows averaged too."""
    out: dict = {}
    for key in ("F", "C", "D"):
        vals = np.array([r[key] for r in runs], dtype=np.float64)
        out[key] = float(vals.mean())
        out[f"{key}_std"] = float(vals.std()) if len(vals) > 1 else None
        out[f"{key}_runs"] = vals.tolist()
    over = {}
    for k in runs[0]["overclustering"]:
        vals = np.array([r["overclustering"][k]["miou"] for r in runs])
        acc = np.array([r["overclustering"][k]["accuracy"] for r in runs])
        over[k] = {"miou": float(vals.mean()), "miou_std": float(vals.std()) if len(vals) > 1 else None,
                   "miou_runs": vals.tolist(), "accuracy": float(acc.mean())}
    out["overclustering"] = over
    rows = []
    for i, row in enumerate(runs[0]["per_sequence"]):
        avg = {k: float(np.mean([r["per_sequence"][i][k] for r in runs])) for k in ("F", "C", "D")}
        rows.append({**row, **avg})
    out["per_sequence"] = rows
    out["D_iou_per_label"] = runs[0]["D_iou_per_label"]
    out["K"] = runs[0]["K"]
    return out


def evaluate_clustering(
    dataset: str,
    root: str | Path,
    checkpoint: str,
    out: str | Path | None = None,
    cfg: EvalConfig | None = None,
    arch: str | None = None,
    videos: str | Path | None = None,
    device: str = "auto",
    verbose: bool = True,
    trust: bool = False,
    feature_transform=None,
) -> dict:
    """Run the whole evaluation and write its outputs -> the metrics dict (also in metrics.json).
    ``feature_transform``: ``FeatureSet -> FeatureSet`` applied after extraction (e.g. the oracle
    :func:`wtours.eval.features.gt_patch_features` of ``wtours bench instruments``)."""
    from wtours.models.weights import load_backbone, split_spec

    cfg = cfg or EvalConfig()
    try:
        cfg.validate()  # a config built in Python has not been through load_config's checks
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t_start = time.perf_counter()
    dev = resolve_device(device)
    random_frames = cfg.frame_sampling == "random" and cfg.frames_per_clip > 0

    def read(draw: int) -> Dataset:
        return read_dataset(dataset, root, videos, cfg.frames_per_clip, cfg.max_instance_id, cfg.split_seed,
                            cfg.missing_annotations, cfg.frame_sampling, cfg.seed + draw, cfg.davis_annotations)

    data: Dataset = read(0)
    model, info = load_backbone(checkpoint, arch, trust=trust)
    picked = (info.get("meta") or {}).get("checkpoint") or {}
    if verbose and "global_step" in picked:  # a training checkpoint: say which of its two backbones this is
        other = "student" if info["role"] == "teacher" else "teacher"
        print(f"note: {split_spec(checkpoint)[0]} is a training checkpoint (step {picked['global_step']}): evaluating "
              f"its {info['role']}{' (the EMA, as exported to backbone.pt)' if info['role'] == 'teacher' else ''}; "
              f"append :{other} for the {other}")
    patch = tuple(model.patch_embed.patch_size)
    if cfg.input_size[0] % patch[0] or cfg.input_size[1] % patch[1]:
        raise UserError(f"input_size {cfg.input_size} is not a multiple of the patch size {patch[0]}")
    check_overcluster_k(cfg, data.n_frames, patch)
    out_dir = ensure_dir(out or Path("runs") / "eval" / dataset)
    seq_names = [s.name for s in data.sequences]
    # random frames (the reference): one draw per repeat, each with its own features
    draws = [data] + [read(r) for r in range(1, cfg.repeats)] if random_frames else [data]
    frames_doc = {
        "dataset": dataset, "root": str(data.root), "frames_per_clip": cfg.frames_per_clip,
        "frame_sampling": cfg.frame_sampling if cfg.frames_per_clip > 0 else "all", "annotations": data.annotations,
        "sequences": {s.name: {"annotated": s.n_annotated, "frames": s.frame_ids} for s in data.sequences},
    }
    if random_frames:
        frames_doc["draws"] = [{"seed": cfg.seed + r, "sequences": {s.name: s.frame_ids for s in d.sequences}}
                               for r, d in enumerate(draws)]
    write_json(out_dir / "frames.json", frames_doc)
    write_text(out_dir / "config.yaml", to_yaml(cfg))
    if verbose and data.split_note:
        print(f"note: {data.split_note}")
    if verbose and data.skipped:
        print(f"note: {data.skip_note}")
    t_load = time.perf_counter() - t_start

    def features(d: Dataset):
        f = extract_features(model, d, dev, tuple(cfg.input_size), [tuple(cfg.eval_size),
                             tuple(cfg.eval_size_dataset)], cfg.batch_size, cfg.workers, cfg.progress,
                             source=checkpoint)
        return f if feature_transform is None else feature_transform(f)

    keep = list(range(min(cfg.overlays, len(seq_names))))
    runs = []
    feat_seconds, feat_frames = 0.0, 0
    first = feats = None
    for r in range(cfg.repeats):
        if feats is None or random_frames:
            feats = features(draws[r] if random_frames else data)
            feat_seconds += feats.seconds["features"]
            feat_frames += feats.n_frames
            first = feats if first is None else first  # overlays and frame counts: the first draw
        runs.append(run_protocol(feats, cfg, seq_names, cfg.seed + r, keep if r == 0 else []))
    feats = first
    agg = _aggregate(runs)
    timing = {"load": t_load, "features": feat_seconds,
              "frames_per_second": feat_frames / max(feat_seconds, 1e-9)}
    for key in runs[0]["seconds"]:
        timing[key] = float(np.mean([r["seconds"][key] for r in runs]))
    over_dir = out_dir / "overlays"
    t0 = time.perf_counter()
    pictures = []
    for s, ov in runs[0]["overlays"].items():
        seq = data.sequences[s]
        pictures += [str(p.relative_to(out_dir)) for p in
                     write_overlays(ensure_dir(over_dir), seq.name, seq.frames, ov["gt"], ov["pred"], cfg.gif)]
    timing["overlays"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    enc = {k: v for k, v in info.items() if k != "meta"}
    enc["meta"] = info.get("meta") or {}
    enc["sha256"] = _sha256(split_spec(checkpoint)[0]) if not checkpoint.startswith("random:") else None
    enc["embed_dim"] = int(feats.grid.shape[1])
    enc["patch_size"] = list(patch)
    settings = {
        "dataset": dataset, "root": str(data.root), "label_kind": data.label_kind,
        "annotations": data.annotations,
        "frames": ("every annotated frame" if cfg.frames_per_clip == 0 else
                   f"{cfg.frames_per_clip} {'random sorted' if random_frames else 'evenly spaced'} annotated frames "
                   f"per clip" + (f", {cfg.repeats} draws (seeds {cfg.seed}..{cfg.seed + cfg.repeats - 1})"
                                  if random_frames else "")),
        "videos": str(videos) if videos else None, "split_note": data.split_note,
        "skipped_unpaired": data.skipped,
        "categories": data.categories, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__, "config": to_dict(cfg),
        "notes": protocol_notes(cfg) + (["DAVIS labels are per-video instance ids: D pools 'instance k' across videos"]
                                   if data.label_kind == "instance" else
                                   ["YTVOS labels are categories (meta.json, alphabetical 1..N, 0 = background)"]),
        "overclustering": "dataset-wise k-means at eval_size_dataset, majority (many-to-one) matching",
    }
    metrics = {
        "F": agg["F"], "C": agg["C"], "D": agg["D"], "unit": "mIoU %",
        "F_std": agg["F_std"], "C_std": agg["C_std"], "D_std": agg["D_std"],
        "runs": {k: agg[f"{k}_runs"] for k in ("F", "C", "D")},
        "overclustering": agg["overclustering"], "K": agg["K"], "D_iou_per_label": agg["D_iou_per_label"],
        "n_sequences": len(seq_names), "n_frames": feats.n_frames,
        "per_sequence": agg["per_sequence"], "settings": settings, "encoder": enc, "timing": timing,
        "pictures": pictures,
        "reference": {"source": "TimeT authors' results slides (Salehi et al., ICCV 2023; shown at ECCV 2024), mIoU % (F, C, D)",
                      "dataset": "davis" if dataset == "synth" else dataset,
                      "methods": {k: dict(zip("FCD", v)) for k, v in
                                  REFERENCE.get("davis" if dataset == "synth" else dataset, {}).items()}},
    }
    write_json(out_dir / "metrics.json", metrics)
    write_csv(out_dir / "per_sequence.csv", agg["per_sequence"])
    if verbose:
        print(summary_table(metrics))
        print(f"wrote {out_dir / 'metrics.json'}")
    return metrics
