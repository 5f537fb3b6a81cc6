"""``wtours bench learn``: proof that training learns (stage 1 vs random initialisation).

    wtours bench learn                              # configs video/proof + eval/proof, seeds 0 1 2, runs/proof
    wtours bench learn --readme README.md           # also rewrite README's proof block (make proof)

1. Synthesizes the walking tour once, in ``<out>/data/synth`` (``data.synth``: the video plus the
   DAVIS- and YTVOS-layout evaluation sets, ``data.synth.sequences`` x ``seq_frames`` frames of
   *other* random scenes than the tour: never seen in training).
2. For each seed ``s``: stage 1 (:func:`wtours.stages.video.run.run_pretrain`, ``seed=s``) into
   ``<out>/seed<s>/``, then :func:`wtours.eval.cli.evaluate_clustering` of its
   ``stage1/backbone.pt`` on both sets into ``<out>/seed<s>/eval/{davis,ytvos}/``.
3. The baseline: ``random:<same arch>@<s>`` (init seed ``s``) on the same sets, into
   ``<out>/random<s>/eval/{davis,ytvos}/``.
4. Per dataset and metric (F, C, D, overclustering ``K=<k>`` of the eval config): mean ± *sample*
   standard deviation (ddof = 1) over the seeds of the per-seed scores (each a mean over the eval
   config's k-means ``repeats``), the difference trained - random and the separation in standard
   deviations ``(mean_t - mean_r) / sqrt((std_t^2 + std_r^2) / 2)`` (Cohen's d with the two stds
   pooled; undefined with one seed or when both stds are 0).
   Goal per dataset: C and F above random by >= 10 points and > 3 std apart.

Writes ``<out>/proof.json`` (settings, machine, wall time per phase, per-seed scores, aggregates,
goal verdicts), ``<out>/proof.md`` and ``<out>/proof.png`` (grouped bars with ± std error bars),
prints the table, and with ``--readme FILE`` replaces the block between ``<!-- proof:begin -->``
and ``<!-- proof:end -->`` in FILE.

``--init-from DIR`` chains two recipes: seed ``s`` starts from ``DIR/seed<s>/stage1/backbone.pt`` of an
earlier proof (e.g. TimeT fine-tuning of the DoRA backbones: ``--config video/proof_timet --init-from
runs/proof``); the baseline stays the random init of the same seed.

Running it again continues: a seed whose ``backbone.pt`` was written by the same training config
and whose evaluations (same eval config, same backbone checksum) exist is not recomputed; a seed
killed during training continues from its ``last.ckpt`` (as ``wtours pretrain`` does).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from wtours.errors import ConfigError, UserError
from wtours.eval.report import scores_of
from wtours.fsutil import atomic_open, ensure_dir, write_json, write_text

DATASETS = ("davis", "ytvos")
DENSE = "dense"  # the group of the dense instruments' rows (J&F on davis/, in-context and linear on ytvos/)
DENSE_METRICS = ("J&F", "in-context", "linear")
#: calibration of the instruments (wtours bench instruments, committed): names the primary instrument
CALIBRATION = Path(__file__).resolve().parents[2] / "docs" / "calibration" / "instruments.json"
#: instrument name of the calibration -> (group, metric) of the proof's aggregates
INSTRUMENT_ROWS = {"F": ("davis", "F"), "C": ("davis", "C"), "D": ("davis", "D"), "J&F": (DENSE, "J&F"),
                   "in-context": (DENSE, "in-context"), "linear": (DENSE, "linear")}
BEGIN, END = "<!-- proof:begin -->", "<!-- proof:end -->"
CURVE_BEGIN, CURVE_END = "<!-- curve:begin -->", "<!-- curve:end -->"
GOAL_POINTS = 10.0
GOAL_SEPARATION = 3.0
GOAL_METRICS = ("C", "F")
STD_KIND = "sample standard deviation over seeds (ddof=1)"
SEPARATION_DEF = "(mean_t - mean_r) / sqrt((std_t^2 + std_r^2) / 2)"
GOAL_TEXT = (f"C and F above random by >= {GOAL_POINTS:g} points and > {GOAL_SEPARATION:g} std apart")


# ----------------------------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def separation(mean_t: float, std_t: float | None, mean_r: float, std_r: float | None) -> float | None:
    """``(mean_t - mean_r) / sqrt((std_t^2 + std_r^2) / 2)``; None when a std is undefined or both are 0."""
    if std_t is None or std_r is None:
        return None
    pooled = math.sqrt((std_t ** 2 + std_r ** 2) / 2)
    if pooled == 0:
        return None
    return (mean_t - mean_r) / pooled


def _groups(metric_names: Sequence[str] | dict[str, Sequence[str]]) -> dict[str, Sequence[str]]:
    """``{group: metric names}``; a plain list of names applies to each of :data:`DATASETS`."""
    return dict(metric_names) if isinstance(metric_names, dict) else {ds: metric_names for ds in DATASETS}


def aggregate(per_seed: dict[str, dict[str, dict[str, dict[str, float]]]], seeds: Sequence[int],
              metric_names: Sequence[str] | dict[str, Sequence[str]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``per_seed[encoder][seed][group][metric]`` -> ``agg[group][metric]`` with mean/std per encoder,
    the difference trained - random and the separation. Groups: the datasets (clustering) and :data:`DENSE`."""
    agg: dict[str, dict[str, dict[str, Any]]] = {}
    for ds, names in _groups(metric_names).items():
        agg[ds] = {}
        for name in names:
            row: dict[str, Any] = {}
            for enc in ("random", "trained"):
                vals = [per_seed[enc][str(s)][ds][name] for s in seeds]
                m, sd = mean_std(vals)
                row[enc] = {"mean": m, "std": sd, "n": len(vals), "values": vals}
            row["diff"] = row["trained"]["mean"] - row["random"]["mean"]
            row["separation"] = separation(row["trained"]["mean"], row["trained"]["std"],
                                           row["random"]["mean"], row["random"]["std"])
            agg[ds][name] = row
    return agg


def goals(agg: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per dataset: C and F above random by >= GOAL_POINTS points and > GOAL_SEPARATION std apart."""
    out = {}
    for ds in DATASETS:
        checks = {}
        for name in GOAL_METRICS:
            r = agg[ds][name]
            sep = r["separation"]
            checks[name] = {"diff": r["diff"], "separation": sep, "points_ok": r["diff"] >= GOAL_POINTS,
                            "separation_ok": sep is not None and sep > GOAL_SEPARATION}
        met = all(c["points_ok"] and c["separation_ok"] for c in checks.values())
        detail = "; ".join(f"{n}: {c['diff']:+.2f} points, {_sep_txt(c['separation'])} std" for n, c in checks.items())
        out[ds] = {"met": met, "checks": checks,
                   "text": f"{ds}: {GOAL_TEXT}: {'met' if met else 'not met'} ({detail})"}
    return out


def _sep_txt(sep: float | None) -> str:
    return "n/a" if sep is None else f"{sep:.1f}"


def _ms_txt(d: dict) -> str:
    return f"{d['mean']:.2f} ± {d['std']:.2f}" if d["std"] is not None else f"{d['mean']:.2f}"


def table_markdown(agg: dict, seeds: Sequence[int], metric_names: Sequence[str] | dict[str, Sequence[str]],
                   caption: str, primary: str | None = None, trained: str = "stage 1") -> str:
    """The proof table (markdown) with its caption; the ``primary`` instrument's row is marked."""
    lines = [caption, "",
             f"| dataset | metric | random init | trained ({trained}) | trained − random | separation (std) |",
             "|---|---|---:|---:|---:|---:|"]
    mark = INSTRUMENT_ROWS.get(primary) if primary else None
    for ds, names in _groups(metric_names).items():
        for name in names:
            r = agg[ds][name]
            label = f"**{name}** (primary)" if mark == (ds, name) else name
            where = "davis (J&F), ytvos (in-context, linear)" if ds == DENSE else ds
            if ds == DENSE:
                where = "davis" if name == "J&F" else "ytvos"
            lines.append(f"| {where} | {label} | {_ms_txt(r['random'])} | {_ms_txt(r['trained'])} | "
                         f"{r['diff']:+.2f} | {_sep_txt(r['separation'])} |")
    return "\n".join(lines)


def primary_instrument(calibration: dict | None) -> tuple[str, dict[str, Any]]:
    """The instrument with the widest calibrated range (``wtours bench instruments``' dynamic range in std units
    of its range row), and that range; ``C`` with no calibration."""
    dyn = ((calibration or {}).get("aggregate") or {}).get("dynamic_range") or {}
    usable = {k: v for k, v in dyn.items() if k in INSTRUMENT_ROWS and v.get("std_units") is not None}
    if not usable:
        return "C", {}
    best = max(usable, key=lambda k: usable[k]["std_units"])
    return best, usable[best]


def primary_verdict(agg: dict, primary: str, rng: dict[str, Any]) -> dict[str, Any]:
    """Trained vs random on the primary instrument: > GOAL_SEPARATION std apart, and the share of the calibrated
    random -> range-row gap it closes (the range row is the supervised baseline when the calibration has one)."""
    g, m = INSTRUMENT_ROWS[primary]
    r = agg.get(g, {}).get(m)
    if r is None:
        return {"instrument": primary, "met": False, "text": f"primary instrument {primary}: not evaluated"}
    sep = r["separation"]
    gap = rng.get("points")
    closed = r["diff"] / gap if gap else None
    ok = sep is not None and sep > GOAL_SEPARATION
    row = rng.get("row", "?")
    units = rng.get("std_units")
    text = (f"primary instrument **{primary}** (widest calibrated range: {row} − random "
            f"{'n/a' if gap is None else f'{gap:+.1f}'} points, "
            f"{'n/a' if units is None else f'{units:.0f}'} std): trained − random "
            f"{r['diff']:+.2f} points, {_sep_txt(sep)} std (goal > {GOAL_SEPARATION:g}: {'met' if ok else 'not met'})"
            + ("" if closed is None else f"; {100 * closed:.0f} % of the {row} − random range"))
    return {"instrument": primary, "separation": sep, "diff": r["diff"], "range": rng, "range_closed": closed,
            "met": ok, "text": text}


def goal_lines(verdicts: dict) -> list[str]:
    return [f"- {v['text'].replace(': met', ': **met**').replace(': not met', ': **not met**')}"
            for v in verdicts.values()]


# ----------------------------------------------------------------------------------------------- picture


def plot_bars(agg: dict, metric_names: Sequence[str] | dict[str, Sequence[str]] = ("F", "C", "D"),
              title: str = "") -> bytes:
    """PNG: per group (dataset, dense instruments) a panel of grouped bars, random vs trained, ± std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(metric_names)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 4.2), squeeze=False)
    for ax, (ds, names) in zip(axes[0], groups.items()):
        xs = range(len(names))
        for j, (enc, colour, label) in enumerate((("random", "0.6", "random init"), ("trained", "tab:blue", "trained"))):
            means = [agg[ds][n][enc]["mean"] for n in names]
            errs = [agg[ds][n][enc]["std"] or 0.0 for n in names]
            bars = ax.bar([x + (j - 0.5) * 0.38 for x in xs], means, 0.38, yerr=errs, capsize=3, color=colour,
                          label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
        ax.set_xticks(list(xs), list(names))
        ax.set_title("dense instruments" if ds == DENSE else f"{ds}: clustering")
        ax.set_ylabel("score % (mIoU, J&F)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- README block


def check_readme(path: str | Path, begin: str = BEGIN, end: str = END) -> str:
    """The text of ``path``; a one-line :class:`UserError` unless it holds one ``begin`` ... ``end`` block."""
    p = Path(path)
    if not p.is_file():
        raise UserError("--readme: file not found" if not p.exists() else "--readme: not a file", path=p)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--readme: cannot read ({e})", path=p) from None
    nb, ne = text.count(begin), text.count(end)
    if nb != 1 or ne != 1 or text.index(begin) > text.index(end):
        raise UserError(f"--readme: needs exactly one '{begin}' line followed by one '{end}' line "
                        f"(found {nb} and {ne}); the block is written between them", path=p)
    return text


def replace_block(text: str, body: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with what lies between the markers replaced by ``body`` (markers kept)."""
    i = text.index(begin) + len(begin)
    j = text.index(end)
    return text[:i] + "\n" + body.strip("\n") + "\n" + text[j:]


def _markers(args: Any) -> tuple[str, str]:
    """The README block ``--readme`` rewrites: ``<!-- NAME:begin -->`` ... ``<!-- NAME:end -->`` of
    ``--readme-block NAME`` (default: the proof block)."""
    name = getattr(args, "readme_block", None) or "proof"
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"--readme-block: letters, digits, '-' and '_' only, got {name!r}")
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_readme(path: str | Path, body: str, begin: str = BEGIN, end: str = END) -> Path:
    text = check_readme(path, begin, end)
    return write_text(path, replace_block(text, body, begin, end))


# ----------------------------------------------------------------------------------------------- phases


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _Times:
    """Seconds per phase, kept in ``<out>/phase_times.json`` so a re-run reports what reused phases cost."""

    def __init__(self, path: Path) -> None:
        self.path = path
        old = _read_json(path)
        self.saved: dict[str, float] = old if isinstance(old, dict) else {}
        self.phases: dict[str, dict[str, Any]] = {}

    def done(self, name: str, seconds: float) -> None:
        self.saved[name] = seconds
        self.phases[name] = {"seconds": seconds, "reused": False}
        write_json(self.path, self.saved)

    def reused(self, name: str, fallback: float | None = None) -> None:
        self.phases[name] = {"seconds": self.saved.get(name, fallback), "reused": True}


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"bench learn: {msg}", file=sys.stderr, flush=True)


def _reusable_export(bb: Path, config_hash: str) -> dict | None:
    """The meta of ``bb`` when it exists, is intact and was written by a run of ``config_hash``; else None (an
    unreadable or damaged export is recomputed)."""
    from wtours.integrity import load_verified

    if not bb.is_file():
        return None
    try:
        meta = load_verified(bb)[0].get("meta", {})
    except Exception:  # noqa: BLE001
        return None
    return meta if meta.get("config_hash") == config_hash else None


def _resume_from(last: Path, config_hash: str, cfg: Any, view: Any, run_dir: Path) -> str | None:
    """``"last"`` when a killed run of this seed left ``last.ckpt`` written by the same training config; a
    one-line error naming the changed keys when another config wrote it; None when there is none."""
    from wtours.config import to_dict
    from wtours.train.checkpointing import check_resume

    if not last.is_file():
        return None
    try:
        check_resume(last, config_hash, to_dict(cfg), view=view)
    except UserError as e:
        raise UserError(str(e).replace("start over with --fresh or another --out",
                                       f"use another --out, or delete {run_dir} to start this seed over")) from None
    return "last"


def _timed_run(phase: str, times: _Times, run: Any) -> dict[str, Any]:
    """``run()`` timed into ``times``; an interrupt says how to continue."""
    t0 = time.perf_counter()
    try:
        summary = run()
    except KeyboardInterrupt:
        print(f"wtours bench learn: stopped during {phase}; run the same command again to continue "
              f"(finished seeds are kept)", file=sys.stderr)
        raise
    times.done(phase, time.perf_counter() - t0)
    return summary


def _train_seed(cfg: Any, run_dir: Path, times: _Times, phase: str, quiet: bool,
                max_seconds: float | None = None, extra_callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Stage 1 of one seed (reused when its backbone.pt was written by this training config); ``max_seconds``
    caps its training time (a run stopped by it is exported and evaluated as it stands)."""
    from wtours.stages.video.config import training_hash, training_view
    from wtours.stages.video.run import run_pretrain

    bb = run_dir / "stage1" / "backbone.pt"
    want = training_hash(cfg)
    meta = _reusable_export(bb, want)
    if meta is not None:
        times.reused(phase)
        _say(quiet, f"{phase}: {bb} exists (same training config): reused")
        return {"steps": meta.get("steps"), "backbone": bb, "reused": True, "collapse_warnings": None,
                "planned_steps": meta.get("planned_steps"), "stopped_by_time": meta.get("stopped_by_time")}
    resume = _resume_from(run_dir / "stage1" / "last.ckpt", want, cfg, training_view, run_dir)
    _say(quiet, f"{phase}: stage 1, seed {cfg.seed}, into {run_dir}" + (" (continuing)" if resume else ""))
    summary = _timed_run(phase, times, lambda: run_pretrain(cfg, run_dir, resume=resume, max_seconds=max_seconds,
                                                            progress=False if quiet else None,
                                                            extra_callbacks=extra_callbacks))
    if summary.get("stopped_by_time"):
        _say(quiet, f"{phase}: stopped by --time-limit at step {summary.get('steps')} of {summary.get('planned_steps')}")
    return {"steps": summary.get("steps"), "backbone": bb, "reused": False,
            "planned_steps": summary.get("planned_steps"), "stopped_by_time": summary.get("stopped_by_time"),
            "collapse_warnings": len(summary.get("collapse_warnings") or [])}


def _train_neco_seed(cfg: Any, run_dir: Path, times: _Times, phase: str, quiet: bool) -> dict[str, Any]:
    """Stage 2 (NeCo) of one seed into ``run_dir/stage2`` (reused when its backbone.pt was written by this NeCo
    config, continued from its ``last.ckpt`` when killed) -> the same dict as :func:`_train_seed`."""
    from wtours.stages.neco.config import neco_training_hash, neco_training_view
    from wtours.stages.neco.run import run_neco

    bb = run_dir / "stage2" / "backbone.pt"
    want = neco_training_hash(cfg)
    meta = _reusable_export(bb, want)
    if meta is not None:
        times.reused(phase)
        _say(quiet, f"{phase}: {bb} exists (same NeCo config): reused")
        return {"steps": meta.get("steps"), "backbone": bb, "reused": True, "collapse_warnings": None,
                "planned_steps": meta.get("steps"), "stopped_by_time": False}
    resume = _resume_from(run_dir / "stage2" / "last.ckpt", want, cfg, neco_training_view, run_dir)
    _say(quiet, f"{phase}: NeCo, seed {cfg.seed}, from {cfg.init}, into {run_dir}" + (" (continuing)" if resume else ""))
    summary = _timed_run(phase, times, lambda: run_neco(cfg, run_dir, resume=resume, progress=False if quiet else None))
    return {"steps": summary.get("steps"), "backbone": bb, "reused": False, "planned_steps": summary.get("steps"),
            "stopped_by_time": False, "collapse_warnings": None}


def _evaluate(dataset: str, root: Path, spec: str, out_dir: Path, ecfg: Any, times: _Times, phase: str,
              quiet: bool, sha256: str | None = None) -> dict:
    """One clustering evaluation (reused when its metrics.json matches spec, data, config and checksum)."""
    from wtours.eval.cli import evaluate_clustering, reusable_metrics

    m = reusable_metrics(out_dir, dataset, root, spec, ecfg, sha256)
    if m is not None:
        times.reused(phase, (m.get("timing") or {}).get("total"))
        return m
    _say(quiet, f"{phase}: clustering {spec} on {dataset}")
    t0 = time.perf_counter()
    m = evaluate_clustering(dataset, root, spec, out_dir, copy.deepcopy(ecfg), verbose=False)
    times.done(phase, time.perf_counter() - t0)
    return m


def dense_configs(args: Any) -> dict:
    """The dense instruments' configs of ``args`` (``--propagation-config`` ...), quiet, without pictures."""
    from types import SimpleNamespace

    from wtours.bench.instruments import _configs

    return _configs(SimpleNamespace(eval_config="eval/proof", propagation_config=args.propagation_config,
                                    incontext_config=args.incontext_config, linear_config=args.linear_config))


def evaluate_dense(spec: str, root: Path, out_dir: Path, cfgs: dict, seed: int, times: _Times, phase: str,
                   quiet: bool, sha256: str | None = None, device: str = "auto") -> dict[str, float]:
    """J&F, in-context and linear-probe scores of ``spec`` (reused when ``out_dir/scores.json`` was computed for
    the same spec, backbone checksum, seed and configs)."""
    from wtours.bench.instruments import dense_scores
    from wtours.config import to_dict

    key = {"spec": spec, "sha256": sha256, "seed": seed, "root": str(root),
           "configs": {k: to_dict(v) for k, v in cfgs.items() if k != "clustering"}}
    cache = out_dir / "scores.json"
    old = _read_json(cache)
    if isinstance(old, dict) and old.get("key") == key:
        times.reused(phase, old.get("seconds"))
        return old["scores"]
    _say(quiet, f"{phase}: propagation, in-context, linear probe of {spec}")
    t0 = time.perf_counter()
    scores = dense_scores(spec, root, out_dir, cfgs, seed, device)
    seconds = time.perf_counter() - t0
    times.done(phase, seconds)
    write_json(cache, {"key": key, "scores": scores, "seconds": seconds})
    return scores


def _machine() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "python": platform.python_version(),
            "platform": platform.platform()}


def _command(args: Any) -> str:
    parts = ["wtours", "bench", "learn", "--config", str(args.config), "--eval-config", str(args.eval_config),
             "--seeds", *map(str, args.seeds), "--out", str(args.out)]
    if getattr(args, "init_from", None):
        parts += ["--init-from", str(args.init_from)]
    if getattr(args, "neco", None):
        parts += ["--neco", str(args.neco)]
        for o in args.neco_overrides:
            parts += ["--neco-set", o]
    if args.max_steps is not None:
        parts += ["--max-steps", str(args.max_steps)]
    if getattr(args, "time_limit", None) is not None:
        parts += ["--time-limit", f"{args.time_limit:g}"]
    for o in args.overrides:
        parts += ["--set", o]
    for o in args.eval_overrides:
        parts += ["--eval-set", o]
    return shlex.join(parts)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


# ----------------------------------------------------------------------------------------------- the bench


def run_learn(args: Any) -> tuple[dict[str, Any], str]:
    """The whole proof (see the module docstring) -> (the proof.json dict, the table as printed)."""
    from wtours.config import load_config, to_dict
    from wtours.eval.config import EvalConfig
    from wtours.stages.video.run import load_pretrain_config, synth_videos

    t_start = time.perf_counter()
    quiet = bool(args.quiet)
    seeds = [int(s) for s in args.seeds]
    if not seeds:
        raise UserError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: each seed once, got {' '.join(map(str, seeds))}")
    if min(seeds) < 0:
        raise UserError(f"--seeds: seeds must be >= 0, got {min(seeds)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps: must be >= 1, got {args.max_steps}")
    if getattr(args, "time_limit", None) is not None and not args.time_limit > 0:
        raise UserError(f"--time-limit: must be a positive number of seconds, got {args.time_limit}")
    init_from = getattr(args, "init_from", None)
    neco = getattr(args, "neco", None)
    if neco and not init_from:
        raise UserError("--neco: give --init-from DIR (the stage-1 proof whose backbones NeCo post-pretrains)")
    if getattr(args, "neco_overrides", None) and not neco:
        raise UserError("--neco-set: only with --neco CONFIG")
    if neco:  # the NeCo config and its overrides are checked before any work
        from wtours.stages.neco.run import load_neco_config

        load_neco_config(neco, args.neco_overrides, args.max_steps)
    if args.readme:
        check_readme(args.readme, *_markers(args))  # refuse before hours of work, not after
    if args.json:
        from wtours.fsutil import check_output_file

        check_output_file(args.json, "--json")
    dense = getattr(args, "instruments", "all") == "all"
    dcfgs = dense_configs(args) if dense else {}
    calib_path = getattr(args, "calibration", None) or (CALIBRATION if CALIBRATION.is_file() else None)
    calibration = _read_json(Path(calib_path)) if calib_path else None
    if calib_path and not isinstance(calibration, dict):
        raise UserError("--calibration: not an instruments.json of 'wtours bench instruments'", path=calib_path)
    primary, primary_range = primary_instrument(calibration if dense else None)
    cfg = load_pretrain_config(args.config, args.overrides, args.max_steps)
    if cfg.data.synth.sequences < 1:
        raise ConfigError("data.synth.sequences: the proof needs at least 1 evaluation sequence, got 0")
    if dense and cfg.data.synth.sequences < 2:
        raise ConfigError(f"data.synth.sequences: the dense instruments need >= 2 evaluation sequences (in-context "
                          f"retrieval and the linear probe split them into memory and queries), got "
                          f"{cfg.data.synth.sequences}; or give --instruments clustering")
    ecfg = load_config(EvalConfig, args.eval_config, args.eval_overrides)
    if quiet:
        ecfg.progress = False
    out = ensure_dir(args.out)
    times = _Times(out / "phase_times.json")

    # 1. the tour and its evaluation sets, once
    synth_dir = out / "data" / "synth"
    t0 = time.perf_counter()
    before = _read_json(synth_dir / "synth.json")
    if cfg.videos:
        _say(quiet, f"the proof trains on the synthetic tour; the config's videos ({len(cfg.videos)}) are ignored")
    cfg.videos = []
    videos = synth_videos(cfg, out, progress=not quiet)
    if _read_json(synth_dir / "synth.json") == before and before is not None:
        times.reused("synth")
    else:
        times.done("synth", time.perf_counter() - t0)
    roots = {"davis": synth_dir / "davis", "ytvos": synth_dir / "ytvos"}

    # 2-3. per seed: stage 1 + its evaluations; the random init of the same seed
    per_seed: dict[str, dict[str, dict]] = {"trained": {}, "random": {}}
    raw: dict[str, dict[str, dict]] = {"trained": {}, "random": {}}
    runs: dict[str, dict[str, Any]] = {}
    resolved = None
    for s in seeds:
        init = None
        if init_from:  # a chain: this seed fine-tunes the same seed's backbone of an earlier proof
            init = Path(init_from) / f"seed{s}" / "stage1" / "backbone.pt"
            if not init.is_file():
                raise UserError(f"--init-from: no backbone of seed {s} (run that proof first, with the same seeds)",
                                path=init)
        run_dir = out / f"seed{s}"
        if neco:  # stage 2 on the seed's stage-1 backbone, on the frames of the same synthetic tour
            cfg_s = load_pretrain_config(args.config, [*args.overrides, f"seed={s}"], None, videos)
            ncfg = load_neco_config(neco, [*args.neco_overrides, f"seed={s}"], args.max_steps, init=str(init),
                                    frames_from=videos)
            resolved = resolved or {**to_dict(cfg_s), "neco_config": to_dict(ncfg)}
            tr = _train_neco_seed(ncfg, run_dir, times, f"seed{s}/neco", quiet)
        else:
            cfg_s = load_pretrain_config(args.config, [*args.overrides, f"seed={s}"], args.max_steps, videos,
                                         init=None if init is None else str(init))
            resolved = resolved or to_dict(cfg_s)
            tr = _train_seed(cfg_s, run_dir, times, f"seed{s}/train", quiet, getattr(args, "time_limit", None))
        sha = _sha256(tr["backbone"])
        runs[str(s)] = {"run_dir": str(run_dir), "steps": tr["steps"], "planned_steps": tr["planned_steps"],
                        "stopped_by_time": tr["stopped_by_time"], "backbone": str(tr["backbone"]),
                        "backbone_sha256": sha, "collapse_warnings": tr["collapse_warnings"],
                        "random_spec": f"random:{cfg_s.model.arch}@{s}"}
        for enc, spec, base, digest in (("trained", str(tr["backbone"]), run_dir, sha),
                                        ("random", f"random:{cfg_s.model.arch}@{s}", out / f"random{s}", None)):
            per_seed[enc][str(s)], raw[enc][str(s)] = {}, {}
            for ds in DATASETS:
                phase = f"{'seed' if enc == 'trained' else 'random'}{s}/eval_{ds}"
                m = _evaluate(ds, roots[ds], spec, base / "eval" / ds, ecfg, times, phase, quiet, digest)
                per_seed[enc][str(s)][ds] = scores_of(m, ecfg.overcluster_k)
                raw[enc][str(s)][ds] = {"metrics": str(base / "eval" / ds / "metrics.json"),
                                        "n_sequences": m.get("n_sequences"), "n_frames": m.get("n_frames"),
                                        **{k: m.get(k) for k in ("F", "C", "D", "F_std", "C_std", "D_std")},
                                        "overclustering": {k: v.get("miou") for k, v in
                                                           (m.get("overclustering") or {}).items()}}
            if dense:
                phase = f"{'seed' if enc == 'trained' else 'random'}{s}/eval_dense"
                per_seed[enc][str(s)][DENSE] = evaluate_dense(spec, synth_dir, base / "eval" / DENSE, dcfgs, s, times,
                                                              phase, quiet, digest, getattr(args, "device", "auto"))
                raw[enc][str(s)][DENSE] = {"scores": str(base / "eval" / DENSE / "scores.json")}

    # 4. the table
    clustering_names = ["F", "C", "D", *(f"K={k}" for k in ecfg.overcluster_k)]
    metric_names: dict[str, Sequence[str]] = {ds: clustering_names for ds in DATASETS}
    if dense:
        metric_names[DENSE] = DENSE_METRICS
    agg = aggregate(per_seed, seeds, metric_names)
    verdicts = goals(agg)
    pverdict = primary_verdict(agg, primary, primary_range)
    steps = sorted({r["steps"] for r in runs.values() if r["steps"] is not None})
    invocation = time.perf_counter() - t_start
    compute = sum(p["seconds"] or 0.0 for p in times.phases.values())
    complete = all(p["seconds"] is not None for p in times.phases.values())
    assert resolved is not None
    resolved.pop("seed", None)
    eval_sets = {ds: {"root": str(roots[ds]), "sequences": raw["trained"][str(seeds[0])][ds]["n_sequences"],
                      "frames": raw["trained"][str(seeds[0])][ds]["n_frames"]} for ds in DATASETS}
    chain = f" from the backbones of `{init_from}`" if init_from else ""
    stage_name = (f"NeCo (`{neco}`" if neco else f"Stage 1 (`{args.config}`")
    caption = (f"{stage_name}{chain}, {', '.join(map(str, steps))} steps, {resolved['model']['arch']}) vs "
               f"random initialisation (same arch, init seed = seed) on the synthetic tour's DAVIS- and "
               f"YTVOS-layout sets ({eval_sets['davis']['sequences']} unseen scenes each, eval `{args.eval_config}`); "
               f"mIoU %" + (f"; dense instruments: propagation J&F on the DAVIS layout (`{args.propagation_config}`), "
                            f"in-context retrieval (`{args.incontext_config}`) and the linear probe "
                            f"(`{args.linear_config}`) mIoU on the YTVOS layout's categories" if dense else "")
               + f"; mean ± sample standard deviation (ddof=1) over seeds {' '.join(map(str, seeds))}; "
               f"separation = {SEPARATION_DEF}.")
    result: dict[str, Any] = {
        "goal": GOAL_TEXT,
        "command": _command(args),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": {
            "config": str(args.config), "overrides": list(args.overrides), "max_steps": args.max_steps,
            "init_from": getattr(args, "init_from", None), "neco": getattr(args, "neco", None),
            "neco_overrides": list(getattr(args, "neco_overrides", None) or []),
            "pretrain_config": resolved, "seeds": seeds, "steps": steps[0] if len(steps) == 1 else steps,
            "eval_config": str(args.eval_config), "eval_overrides": list(args.eval_overrides),
            "eval_config_resolved": to_dict(ecfg), "eval_sets": eval_sets, "video": videos[0],
            "instruments": getattr(args, "instruments", "all"),
            "dense_configs": {k: to_dict(v) for k, v in dcfgs.items() if k != "clustering"},
            "calibration": str(calib_path) if calib_path else None,
            "std": STD_KIND, "separation": SEPARATION_DEF,
            "scores": "per seed: the eval's mean over its k-means repeats; F/C/D/K=<k> mIoU %",
            "baseline": "random:<arch>@<seed> (timm init after torch.manual_seed(seed))",
            "seed_note": "pretrain_config.seed is each of seeds",
        },
        "machine": _machine(),
        "wall_s": {"phases": times.phases, "total": compute, "total_complete": complete,
                   "this_invocation": invocation},
        "runs": runs,
        "per_seed": per_seed,
        "per_seed_raw": raw,
        "aggregates": agg,
        "goals": verdicts,
        "primary": pverdict,
        "caption": caption,
    }

    table = table_markdown(agg, seeds, metric_names, caption, primary if dense else None,
                           trained="NeCo" if neco else ("chained" if init_from else "stage 1"))
    gl = goal_lines(verdicts) + ([f"- {pverdict['text']}"] if dense else [])
    wall = (f"{_fmt_s(compute)} of compute" + ("" if complete else " (some reused phases' times unknown)")
            + f"; this invocation {_fmt_s(invocation)}")
    machine = result["machine"]
    md = [f"# Proof that training learns: {out.name}", "", table, "", *gl, "",
          "## Settings", "",
          f"- command: `{result['command']}`",
          f"- date: {result['date']}",
          f"- pretrain config: `{args.config}`" + (f" with {', '.join(f'`{o}`' for o in args.overrides)}"
                                                   if args.overrides else "") + f"; seeds {seeds}; steps {steps}",
          f"- eval config: `{args.eval_config}`" + (f" with {', '.join(f'`{o}`' for o in args.eval_overrides)}"
                                                    if args.eval_overrides else ""),
          "- evaluation sets: " + ", ".join(f"{ds} {v['sequences']} sequences / {v['frames']} frames"
                                            for ds, v in eval_sets.items()) + " (scenes not in the training tour)",
          f"- machine: {machine['cpu_count']} CPU cores, {machine['device']}, torch {machine['torch']}",
          f"- wall time: {wall}", "",
          "| phase | seconds | reused |", "|---|---:|---|"]
    for k, v in times.phases.items():
        secs = "?" if v["seconds"] is None else f"{v['seconds']:.1f}"
        md.append(f"| {k} | {secs} | {'yes' if v['reused'] else ''} |")
    md += ["", "![proof](proof.png)", ""]
    write_json(out / "proof.json", result)
    with atomic_open(out / "proof.png", "wb") as f:
        f.write(plot_bars(agg, metric_names, title=f"mean ± std over seeds {' '.join(map(str, seeds))} "
                                     f"({', '.join(map(str, steps))} steps)"))
    write_text(out / "proof.md", "\n".join(md))
    if args.json:
        write_json(args.json, result)
    if args.readme:
        body = "\n".join([
            table, "", *gl, "",
            f"Command: `{result['command']}`, {result['date'][:10]}, wall time {wall} on "
            f"{machine['cpu_count']} CPU cores ({machine['device']}, torch {machine['torch']}). Settings, "
            f"per-seed scores and the bar chart: `{_rel(out, Path(args.readme).parent)}/` "
            "(`proof.md`, `proof.json`, `proof.png`).",
        ])
        write_readme(args.readme, body, *_markers(args))
    return result, "\n".join([table, "", *gl, "", f"wall time: {wall}"])


def _rel(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:
        return path.as_posix()
