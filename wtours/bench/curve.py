"""``wtours bench learn --curve`` (``make proof-long``): does the encoder get better *while* it trains?

One longer stage-1 run per seed, its teacher backbone exported at ``--points`` steps along the way
(:class:`BackboneSnapshots`), and beside it the **same architecture trained with the ground truth for the same
budget** (:mod:`wtours.bench.supervised`: same steps, same frames per step, snapshots at the same steps). Every
snapshot, the random initialisation (step 0 of both curves) and the final backbones are scored by every
instrument (:func:`wtours.bench.instruments.score_row`: clustering F / C / D, propagation J&F, in-context and
linear-probe mIoU) on the synthetic tour's evaluation sets, which hold scenes the run never trains on.

The **primary** instrument is the one with the widest calibrated range: the largest
``(supervised_final - random) / std_random`` (std over seeds; with one seed, the largest difference in points).
Goal (issue 16): on the primary instrument the trained curve ends above random by > 3 std and closes >= 30 % of
the random -> supervised gap; the teacher's per-sample entropy stays <= 0.8 x log C for the whole run
(``train/teacher_entropy`` of ``metrics.csv``).

Writes ``<out>/curve.json`` (settings, per-seed scores per step, aggregates, verdicts, collapse signals),
``<out>/curve.md`` (table) and ``<out>/curve.png`` (one panel per instrument: trained mean ± std band,
supervised, random band). Re-running reuses finished runs, snapshots and scores.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from lightning.pytorch.callbacks import Callback

from wtours.errors import UserError
from wtours.fsutil import atomic_open, ensure_dir, write_json, write_text

INSTRUMENTS = ("F", "C", "D", "J&F", "in-context", "linear")
GOAL_STD = 3.0
GOAL_GAP = 0.30
GOAL_ENTROPY = 0.8


class BackboneSnapshots(Callback):
    """Export the teacher's backbone at the given optimizer steps: ``<folder>/step<k>/backbone.pt``.

    Rank 0 only; a snapshot that exists is kept (a resumed run does not rewrite the steps it passed).
    """

    def __init__(self, steps: Sequence[int], folder: str | Path, arch: str) -> None:
        self.steps = sorted(set(int(s) for s in steps))
        self.folder = Path(folder)
        self.arch = arch

    def path(self, step: int) -> Path:
        return self.folder / f"step{step}" / "backbone.pt"

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step not in self.steps or not trainer.is_global_zero or self.path(step).is_file():
            return
        from wtours.models.weights import export_backbone

        ensure_dir(self.path(step).parent)
        export_backbone(pl_module.teacher.vit, self.arch, self.path(step), {"steps": step, "snapshot": True})


def curve_steps(total: int, points: int) -> list[int]:
    """``points`` steps spread evenly over ``(0, total]``, the last one ``total`` (fewer when ``total`` is small)."""
    if total < 1 or points < 1:
        raise UserError(f"--points / steps: need >= 1 (got {points} points over {total} steps)")
    return sorted({max(1, round(total * (i + 1) / points)) for i in range(points)})


def read_entropy(metrics_csv: Path) -> list[tuple[int, float]]:
    """(step, teacher entropy) rows of a stage-1 ``metrics.csv`` (empty when the column is absent)."""
    try:
        with metrics_csv.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    out = []
    for r in rows:
        v, s = r.get("train/teacher_entropy"), r.get("step")
        if v not in (None, "") and s not in (None, ""):
            out.append((int(float(s)), float(v)))
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else None)


def aggregate(scores: dict[str, dict[str, dict[int, dict[str, float]]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """``scores[encoder][seed][step][instrument]`` -> ``agg[encoder][step][instrument] = {mean, std, n}``."""
    agg: dict[str, dict[int, dict[str, Any]]] = {}
    for enc, by_seed in scores.items():
        steps = sorted({st for per in by_seed.values() for st in per})
        agg[enc] = {}
        for st in steps:
            agg[enc][st] = {}
            for k in INSTRUMENTS:
                vals = [per[st][k] for per in by_seed.values() if st in per and k in per[st]]
                if vals:
                    m, s = _mean_std(vals)
                    agg[enc][st][k] = {"mean": m, "std": s, "n": len(vals)}
    return agg


def verdict(agg: dict, entropy_max: float | None, log_c: float) -> dict[str, Any]:
    """Primary instrument (widest calibrated range) and the goal checks on it."""
    rnd = agg["random"][0]
    last_t = agg["trained"][max(agg["trained"])]
    last_s = agg["supervised"][max(agg["supervised"])] if agg.get("supervised") else None
    ranges = {}
    for k in INSTRUMENTS:
        if last_s is None or k not in last_s or k not in rnd:
            continue
        pts = last_s[k]["mean"] - rnd[k]["mean"]
        sd = rnd[k]["std"]
        ranges[k] = {"points": pts, "std_units": pts / sd if sd else None}
    with_std = {k: v for k, v in ranges.items() if v["std_units"] is not None}
    pool = with_std or ranges
    key = "std_units" if with_std else "points"
    primary = max(pool, key=lambda k: pool[k][key]) if pool else "C"
    t, r = last_t[primary], rnd[primary]
    pooled = math.sqrt(((t["std"] or 0) ** 2 + (r["std"] or 0) ** 2) / 2)
    sep = (t["mean"] - r["mean"]) / pooled if pooled > 0 and t["std"] is not None and r["std"] is not None else None
    gap = ranges.get(primary, {}).get("points")
    closed = (t["mean"] - r["mean"]) / gap if gap else None
    ent_ok = entropy_max is not None and entropy_max <= GOAL_ENTROPY * log_c
    checks = {"separation": sep, "separation_ok": sep is not None and sep > GOAL_STD,
              "gap_closed": closed, "gap_ok": closed is not None and closed >= GOAL_GAP,
              "entropy_max": entropy_max, "entropy_bound": GOAL_ENTROPY * log_c, "entropy_ok": ent_ok}
    met = checks["separation_ok"] and checks["gap_ok"] and ent_ok
    rng = ranges.get(primary, {})
    rng_txt = f"{rng['points']:+.1f} points" if rng else "n/a"
    if rng.get("std_units") is not None:
        rng_txt += f", {rng['std_units']:.1f} std"
    sep_txt = "n/a" if sep is None else f"{sep:.1f}"
    gap_txt = "n/a" if closed is None else f"{100 * closed:.0f} %"
    ent_txt = "n/a" if entropy_max is None else f"{entropy_max:.2f}"
    text = (f"primary instrument {primary} (supervised − random {rng_txt}): trained − random "
            f"{t['mean'] - r['mean']:+.2f} points, {sep_txt} std (goal > {GOAL_STD:g}); gap closed {gap_txt} "
            f"(goal >= {100 * GOAL_GAP:.0f} %); teacher entropy max {ent_txt} nats (goal <= "
            f"{GOAL_ENTROPY * log_c:.2f} = {GOAL_ENTROPY:g} log C): {'**met**' if met else '**not met**'}")
    return {"primary": primary, "ranges": ranges, "checks": checks, "met": met, "text": text}


def table_markdown(agg: dict, caption: str) -> str:
    def ms(d: dict | None) -> str:
        if d is None:
            return ""
        return f"{d['mean']:.1f}" + (f" ± {d['std']:.1f}" if d.get("std") is not None else "")

    lines = [caption, "", "| encoder | step | " + " | ".join(INSTRUMENTS) + " |", "|---|---:|" + "---:|" * len(INSTRUMENTS)]
    for enc in ("random", "trained", "supervised"):
        for st, row in sorted(agg.get(enc, {}).items()):
            lines.append(f"| {enc} | {st} | " + " | ".join(ms(row.get(k)) for k in INSTRUMENTS) + " |")
    return "\n".join(lines)


def plot_curves(agg: dict, title: str) -> bytes:
    """One panel per instrument: trained (mean ± std band), supervised, random (band): PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True)
    for ax, k in zip(axes.ravel(), INSTRUMENTS):
        r = agg["random"][0].get(k)
        for enc, colour in (("trained", "tab:blue"), ("supervised", "tab:green")):
            pts = [(0, r)] + [(st, row.get(k)) for st, row in sorted(agg.get(enc, {}).items())]
            pts = [(st, d) for st, d in pts if d is not None]
            if not pts:
                continue
            xs = [st for st, _ in pts]
            ms = [d["mean"] for _, d in pts]
            sd = [d["std"] or 0.0 for _, d in pts]
            ax.plot(xs, ms, "o-", color=colour, label=f"{enc}" + (" (GT labels, same budget)" if enc == "supervised"
                                                                   else " (stage 1)"))
            ax.fill_between(xs, [m - s for m, s in zip(ms, sd)], [m + s for m, s in zip(ms, sd)], color=colour,
                            alpha=0.15)
        if r is not None:
            ax.axhline(r["mean"], color="grey", ls="--", label="random init")
            if r.get("std"):
                ax.axhspan(r["mean"] - r["std"], r["mean"] + r["std"], color="grey", alpha=0.12)
        ax.set_title(k if k in ("J&F", "in-context", "linear") else f"clustering {k}")
        ax.set_xlabel("training step")
        ax.set_ylabel("score %")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _instrument_configs(args: Any) -> dict:
    from types import SimpleNamespace

    from wtours.bench.instruments import _configs

    return _configs(SimpleNamespace(eval_config=args.eval_config, propagation_config=args.propagation_config,
                                    incontext_config=args.incontext_config, linear_config=args.linear_config))


def _score(spec: str, root: Path, out: Path, cfgs: dict, seed: int, device: str) -> dict[str, float]:
    """Every instrument on ``spec`` (cached in ``out/scores.json`` keyed by the spec and its file's checksum)."""
    from wtours.bench.instruments import score_row
    from wtours.bench.learn import _sha256

    path = Path(spec)
    key = {"spec": spec, "sha256": _sha256(path) if path.is_file() else None, "seed": seed}
    cache = out / "scores.json"
    try:
        old = json.loads(cache.read_text())
        if old.get("key") == key:
            return old["scores"]
    except (OSError, ValueError):
        pass
    scores = score_row(spec, root, out, cfgs, seed, device)
    write_json(cache, {"key": key, "scores": scores})
    return scores


def run_curve(args: Any) -> tuple[dict[str, Any], str]:
    """The curve (see the module docstring) -> (curve.json dict, the table as printed)."""
    from wtours.bench.learn import _say, _train_seed, _Times
    from wtours.bench.supervised import supervised_set, train_supervised
    from wtours.stages.video.run import load_pretrain_config, synth_videos
    from wtours.stages.video.schedules import clips_per_step

    from wtours.bench.learn import CURVE_BEGIN, CURVE_END, check_readme, write_readme

    t_start = time.perf_counter()
    quiet = bool(args.quiet)
    seeds = [int(s) for s in args.seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds: give distinct seeds >= 0, got {' '.join(map(str, seeds)) or 'none'}")
    if args.points < 2:
        raise UserError(f"--points: a curve needs >= 2 points, got {args.points}")
    if args.supervised_sequences < 2:
        raise UserError(f"--supervised-sequences: needs >= 2, got {args.supervised_sequences}")
    if args.readme:
        check_readme(args.readme, CURVE_BEGIN, CURVE_END)
    cfg0 = load_pretrain_config(args.config, args.overrides, args.max_steps)
    if cfg0.data.synth.sequences < 2:
        raise UserError(f"data.synth.sequences: the curve's instruments need >= 2 evaluation sequences (in-context "
                        f"and the linear probe split them), got {cfg0.data.synth.sequences}")
    total = cfg0.trainer.max_steps
    if total is None:
        raise UserError(f"--curve needs a run length in steps: {args.config} has no trainer.max_steps (give --max-steps)")
    marks = curve_steps(total, args.points)
    cfgs = _instrument_configs(args)
    out = ensure_dir(args.out)
    times = _Times(out / "phase_times.json")
    cfg0.videos = []
    videos = synth_videos(cfg0, out, progress=not quiet)
    root = out / "data" / "synth"
    s_cfg = cfg0.data.synth
    sup_root = supervised_set(out / "data" / "supervised", args.supervised_sequences, s_cfg.seq_frames, s_cfg.height,
                              s_cfg.width, s_cfg.seed)
    frames_per_step = clips_per_step(cfg0, 1) * cfg0.data.frames_per_clip
    scores: dict[str, dict[str, dict[int, dict[str, float]]]] = {"random": {}, "trained": {}, "supervised": {}}
    entropy: dict[str, list[tuple[int, float]]] = {}
    for s in seeds:
        cfg = load_pretrain_config(args.config, [*args.overrides, f"seed={s}"], args.max_steps, videos)
        run_dir = out / f"seed{s}"
        snaps = BackboneSnapshots(marks[:-1], run_dir / "snapshots", cfg.model.arch)
        _train_seed(cfg, run_dir, times, f"seed{s}/train", quiet, getattr(args, "time_limit", None), [snaps])
        entropy[str(s)] = read_entropy(run_dir / "stage1" / "metrics.csv")
        _say(quiet, f"seed{s}/supervised: {total} steps x {frames_per_step} frames with GT labels")
        t0 = time.perf_counter()
        sup = train_supervised(cfg.model.arch, sup_root, out / f"supervised{s}", steps=total, batch=frames_per_step,
                               seed=s, lr=cfg.optim.lr, short_side=cfg.data.short_side,
                               crop_size=cfg.crops.global_size, snapshots=marks)
        times.done(f"seed{s}/supervised", time.perf_counter() - t0)
        trained = {m: snaps.path(m) for m in marks[:-1]}
        trained[marks[-1]] = run_dir / "stage1" / "backbone.pt"
        scores["random"][str(s)] = {0: _score(f"random:{cfg.model.arch}@{s}", root, out / f"random{s}" / "scores", cfgs,
                                              s, args.device)}
        for enc, paths in (("trained", trained), ("supervised", sup)):
            scores[enc][str(s)] = {}
            for m in marks:
                if not Path(paths[m]).is_file():
                    continue  # a run stopped by --time-limit before this step
                _say(quiet, f"seed{s}/{enc}: instruments at step {m}")
                base = (run_dir if enc == "trained" else out / f"supervised{s}") / "scores" / f"step{m}"
                scores[enc][str(s)][m] = _score(str(paths[m]), root, base, cfgs, s, args.device)
    agg = aggregate(scores)
    ent_all = [v for rows in entropy.values() for _, v in rows]
    log_c = math.log(cfg0.model.out_dim)
    v = verdict(agg, max(ent_all) if ent_all else None, log_c)
    caption = (f"Learning curve: stage 1 (`{args.config}`, {total} steps x {frames_per_step} frames, "
               f"{cfg0.model.arch}) vs the same arch trained with GT labels for the same budget vs its random init, "
               f"on the synthetic tour's unseen DAVIS-/YTVOS-layout scenes; scores %, mean ± std over seeds "
               f"{' '.join(map(str, seeds))}; instruments: clustering F/C/D (`{args.eval_config}`), propagation J&F, "
               f"in-context and linear-probe mIoU.")
    table = table_markdown(agg, caption)
    wall = time.perf_counter() - t_start
    result = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "settings": {"config": args.config, "overrides": list(args.overrides), "steps": total, "marks": marks,
                           "seeds": seeds, "frames_per_step": frames_per_step, "log_c": log_c,
                           "supervised_set": str(sup_root), "eval_sets": str(root)},
              "scores": {e: {s: {str(m): v for m, v in d.items()} for s, d in by.items()} for e, by in scores.items()},
              "aggregates": {e: {str(m): v for m, v in d.items()} for e, d in agg.items()},
              "teacher_entropy": entropy, "verdict": v, "wall_s": wall, "phases": times.phases}
    write_json(out / "curve.json", result)
    with atomic_open(out / "curve.png", "wb") as f:
        f.write(plot_curves(agg, f"{args.config}: {total} steps, seeds {' '.join(map(str, seeds))}"))
    md = [f"# Learning curve: {out.name}", "", table, "", f"- {v['text']}", "", "![curve](curve.png)", ""]
    write_text(out / "curve.md", "\n".join(md))
    if args.json:
        write_json(args.json, result)
    if args.readme:
        import os

        rel = Path(os.path.relpath(out, Path(args.readme).parent)).as_posix()
        write_readme(args.readme, "\n".join([table, "", f"- {v['text']}", "",
                                              f"{result['date'][:10]}, wall time {wall / 60:.1f} min; files: `{rel}/` "
                                              "(`curve.md`, `curve.json`, `curve.png`)."]), CURVE_BEGIN, CURVE_END)
    return result, "\n".join([table, "", f"- {v['text']}", f"wall time: {wall / 60:.1f} min"])
