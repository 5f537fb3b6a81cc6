"""``wtours bench instruments``: how far apart can each dense instrument put encoders, against its noise?

    wtours bench instruments                                   # the proof's synthetic sets, seeds 0 1 2
    wtours bench instruments --encoder dora=runs/proof/seed{seed}/stage1/backbone.pt --range-row supervised

On the synthetic evaluation sets (``wtours synth``: the DAVIS layout for clustering and propagation, the
YTVOS layout, categories, for in-context retrieval and the linear probe; by default the proof's 8 scenes x 12
frames at 320x180, written once into ``<out>/data/synth``), every **row** is scored by every **instrument**:

- rows: ``random`` (``random:<arch>@<seed>``), ``pixels`` (``pixels:<patch>``, raw colour mean / std +
  position per patch, :mod:`wtours.models.pixels`), ``oracle`` (the ground truth at patch resolution as the
  feature field, :func:`wtours.eval.features.gt_patch_features`: the best an encoder of that patch size can
  do under each protocol), ``supervised`` (the same arch trained from ``random:<arch>@<seed>`` with GT labels for
  the proof's budget, ``--supervised-steps`` x ``--supervised-batch`` frames, :mod:`wtours.bench.supervised`; the
  default top of the dynamic range: what this arch can learn at this budget), and any ``--encoder
  NAME=CHECKPOINT`` (``{seed}`` in the path is replaced by the seed, e.g. the proof's backbones);
- instruments: clustering F / C / D (``--eval-config``, default ``eval/proof``), propagation J&F
  (``eval/propagation_tiny``), in-context mIoU (``eval/incontext_tiny``), linear-probe mIoU
  (``eval/linear_tiny``).

Per seed ``s``: the random init seed is ``s``; the instruments' own seeds are offset by ``s`` (k-means,
linear-probe init and order, memory sampling), so the deterministic rows (pixels, oracle) vary only by
those. Per row and instrument: mean ± sample std (ddof 1) over the seeds; per non-random row its distance
from random in points and in pooled std, ``(m - m_random) / sqrt((s^2 + s_random^2) / 2)``; an instrument's
**dynamic range** is that distance for the ``--range-row`` (default: the first ``--encoder`` row, else
``oracle``).

Writes ``<out>/instruments.json`` (settings, per-seed scores, aggregates, wall times) and
``<out>/instruments.md`` (the table), prints the table.
"""

from __future__ import annotations

import datetime
import math
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from wtours.errors import UserError
from wtours.fsutil import ensure_dir, write_json, write_text

INSTRUMENTS = ("F", "C", "D", "J&F", "in-context", "linear")
DEFAULT_ARCH = "vit_nano_patch8_64"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for one value)."""
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else None)


def separation(m: float, s: float | None, m0: float, s0: float | None) -> float | None:
    if s is None or s0 is None:
        return None
    pooled = math.sqrt((s * s + s0 * s0) / 2)
    return (m - m0) / pooled if pooled > 0 else None


def parse_encoders(items: Sequence[str]) -> dict[str, str]:
    """``NAME=CHECKPOINT`` items -> {name: checkpoint}; names unique, not a built-in row."""
    out: dict[str, str] = {}
    for it in items:
        name, sep, ckpt = it.partition("=")
        name, ckpt = name.strip(), ckpt.strip()
        if not sep or not name or not ckpt:
            raise UserError(f"--encoder {it!r}: expected NAME=CHECKPOINT, e.g. supervised=runs/sup/backbone.pt")
        if name in ("random", "pixels", "oracle") or name in out:
            raise UserError(f"--encoder {it!r}: the row name '{name}' is taken")
        out[name] = ckpt
    return out


def _configs(args: Any):
    from wtours.config import load_config
    from wtours.eval.config import EvalConfig
    from wtours.eval.incontext import InContextConfig
    from wtours.eval.linear_probe import LinearConfig
    from wtours.eval.propagation import PropagationConfig

    quiet = ["progress=false", "overlays=0"]
    return {"clustering": load_config(EvalConfig, args.eval_config, quiet + ["gif=false"]),
            "propagation": load_config(PropagationConfig, args.propagation_config, quiet),
            "incontext": load_config(InContextConfig, args.incontext_config, quiet),
            "linear": load_config(LinearConfig, args.linear_config, quiet)}


def dense_scores(spec: str, root: Path, out: Path, cfgs: dict, seed: int, device: str, oracle: bool = False) -> dict:
    """The dense instruments on one encoder spec -> {"J&F", "in-context", "linear": score %} (``root``: a
    ``wtours synth`` folder; propagation on its davis/, retrieval and the probe on its ytvos/)."""
    import copy

    from wtours.eval.features import gt_patch_features
    from wtours.eval.incontext import evaluate_incontext
    from wtours.eval.linear_probe import evaluate_linear
    from wtours.eval.propagation import evaluate_propagation

    kw = {"device": device, "verbose": False, "feature_transform": gt_patch_features if oracle else None}
    c = copy.deepcopy(cfgs)
    c["linear"].seed += seed
    c["incontext"].seed += seed
    pr = evaluate_propagation("synth", root, spec, out / "propagation", c["propagation"], **kw)
    ic = evaluate_incontext("synth", root, spec, out / "incontext", c["incontext"], **kw)
    li = evaluate_linear("synth", root, spec, out / "linear", c["linear"], **kw)
    return {"J&F": pr["J&F"], "in-context": ic["mIoU"], "linear": li["mIoU"]}


def score_row(spec: str, root: Path, out: Path, cfgs: dict, seed: int, device: str, oracle: bool = False) -> dict:
    """Every instrument on one encoder spec -> {instrument: score %}."""
    import copy

    from wtours.eval.cli import evaluate_clustering
    from wtours.eval.features import gt_patch_features

    kw = {"device": device, "verbose": False, "feature_transform": gt_patch_features if oracle else None}
    c = copy.deepcopy(cfgs["clustering"])
    c.seed += seed
    cl = evaluate_clustering("synth", root, spec, out / "clustering", c, **kw)
    return {"F": cl["F"], "C": cl["C"], "D": cl["D"], **dense_scores(spec, root, out, cfgs, seed, device, oracle)}


def aggregate(per_seed: dict[str, dict[int, dict[str, float]]], range_row: str | None) -> dict:
    rows = {}
    for name, by_seed in per_seed.items():
        rows[name] = {}
        for k in INSTRUMENTS:
            m, s = mean_std([by_seed[sd][k] for sd in sorted(by_seed)])
            rows[name][k] = {"mean": m, "std": s}
    base = rows.get("random")
    for name, r in rows.items():
        for k in INSTRUMENTS:
            if base is None or name == "random":
                continue
            r[k]["minus_random"] = r[k]["mean"] - base[k]["mean"]
            r[k]["separation"] = separation(r[k]["mean"], r[k]["std"], base[k]["mean"], base[k]["std"])
    dyn = {}
    if base is not None and range_row in rows:
        for k in INSTRUMENTS:
            dyn[k] = {"row": range_row, "points": rows[range_row][k]["minus_random"],
                      "std_units": rows[range_row][k]["separation"], "random_std": base[k]["std"]}
    return {"rows": rows, "dynamic_range": dyn}


def _ms(d: dict) -> str:
    return f"{d['mean']:.1f}" + (f" ± {d['std']:.1f}" if d.get("std") is not None else "")


def table_markdown(agg: dict, seeds: Sequence[int], caption: str) -> str:
    head = "| row | " + " | ".join(INSTRUMENTS) + " |"
    lines = [caption, "", head, "|---|" + "---:|" * len(INSTRUMENTS)]
    for name, r in agg["rows"].items():
        lines.append(f"| {name} | " + " | ".join(_ms(r[k]) for k in INSTRUMENTS) + " |")
    dyn = agg["dynamic_range"]
    if dyn:
        row = next(iter(dyn.values()))["row"]

        def cell(d):
            sep = d["std_units"]
            return f"{d['points']:+.1f} ({'n/a' if sep is None else f'{sep:.1f}'})"

        lines.append(f"| range: {row} − random, points (std units) | " + " | ".join(cell(dyn[k]) for k in INSTRUMENTS)
                     + " |")
    lines += ["", f"mean ± sample std over seeds {' '.join(map(str, seeds))}; std units = difference / "
                  "sqrt((std_row² + std_random²) / 2)."]
    return "\n".join(lines)


def run_instruments(args: Any) -> tuple[dict, str]:
    from wtours.eval.cli import resolve_device
    from wtours.video.synth import synthesize

    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(f"--seeds: give distinct seeds >= 0, got {' '.join(map(str, seeds)) or 'none'}")
    extra = parse_encoders(args.encoder or [])
    sup_steps = int(getattr(args, "supervised_steps", 0) or 0)
    sup_batch = int(getattr(args, "supervised_batch", 16))
    if sup_steps < 0 or sup_batch < 1:
        raise UserError(f"--supervised-steps must be >= 0 and --supervised-batch >= 1 (got {sup_steps}, {sup_batch})")
    if sup_steps and "supervised" in extra:
        raise UserError("--encoder supervised=...: the row name 'supervised' is taken (or give --supervised-steps 0)")
    range_row = args.range_row or ("supervised" if sup_steps else next(iter(extra)) if extra else "oracle")
    if range_row not in ("pixels", "oracle", *extra, *(["supervised"] if sup_steps else [])):
        raise UserError(f"--range-row {range_row}: not a row (pixels, oracle{''.join(', ' + e for e in extra)})")
    resolve_device(args.device)
    cfgs = _configs(args)
    out = ensure_dir(args.out)
    quiet = bool(args.quiet)
    times: dict[str, float] = {}
    if args.data:
        root = Path(args.data)
        if not (root / "davis").is_dir() or not (root / "ytvos").is_dir():
            raise UserError("not a 'wtours synth' folder (expected davis/ and ytvos/ in it)", path=root)
    else:
        root = out / "data" / "synth"
        if not (root / "synth.json").is_file():
            t0 = time.perf_counter()
            synthesize(root, width=args.width, height=args.height, fps=15.0, seconds=1.0, sequences=args.sequences,
                       seq_frames=args.seq_frames, seed=args.data_seed, progress=not quiet)
            times["synth"] = time.perf_counter() - t0
    from wtours.models.weights import vit_geometry

    patch = int(vit_geometry(args.arch).patch_size)  # an unknown arch: one line, before any work
    rows: dict[str, str] = {"random": f"random:{args.arch}@{{seed}}"}
    rows["pixels"] = f"pixels:{patch}"
    rows["oracle"] = f"pixels:{patch}"  # features replaced by the ground-truth field
    rows.update(extra)
    if sup_steps:  # the same arch trained with GT labels for the proof's budget, one per seed
        from wtours.bench.supervised import supervised_set, train_supervised

        t0 = time.perf_counter()
        sup_root = supervised_set(out / "data" / "supervised", 16, args.seq_frames, args.height, args.width,
                                  args.data_seed)
        for s in seeds:
            if not quiet:
                print(f"[supervised seed {s}] {sup_steps} steps x {sup_batch} frames with GT labels", flush=True)
            train_supervised(args.arch, sup_root, out / "supervised" / f"seed{s}" / "train", steps=sup_steps,
                             batch=sup_batch, seed=s, short_side=96, crop_size=64, device=None if args.device == "auto"
                             else args.device)
        rows["supervised"] = str(out / "supervised" / "seed{seed}" / "train" / "backbone.pt")
        times["supervised_training"] = time.perf_counter() - t0
    per_seed: dict[str, dict[int, dict[str, float]]] = {name: {} for name in rows}
    specs: dict[str, dict[int, str]] = {name: {} for name in rows}
    for name, spec_t in rows.items():
        t0 = time.perf_counter()
        for s in seeds:
            spec = spec_t.replace("{seed}", str(s))
            specs[name][s] = spec
            if not quiet:
                print(f"[{name} seed {s}] {spec}", flush=True)
            per_seed[name][s] = score_row(spec, root, out / name / f"seed{s}", cfgs, s, args.device,
                                          oracle=name == "oracle")
        times[name] = time.perf_counter() - t0
    agg = aggregate(per_seed, range_row)
    times["total"] = time.perf_counter() - t_start
    sup_txt = (f", the same arch trained with GT labels for {sup_steps} steps x {sup_batch} frames (supervised)"
               if sup_steps else "")
    caption = (f"Instrument calibration on the synthetic sets ({root}): {args.arch} random init vs raw pixels vs "
               f"the ground truth at patch resolution (oracle){''.join(', ' + e for e in extra)}{sup_txt}; scores in %")
    table = table_markdown(agg, seeds, caption)
    from wtours.config import to_dict

    result = {
        "settings": {"arch": args.arch, "seeds": seeds, "data": str(root), "device": args.device,
                     "rows": {n: specs[n] for n in rows}, "range_row": range_row,
                     "configs": {k: to_dict(v) for k, v in cfgs.items()},
                     "instruments": {"F/C/D": f"clustering ({args.eval_config}) on davis/",
                                     "J&F": f"propagation ({args.propagation_config}) on davis/",
                                     "in-context": f"incontext ({args.incontext_config}) on ytvos/",
                                     "linear": f"linear ({args.linear_config}) on ytvos/"},
                     "std": "sample standard deviation over seeds (ddof=1)"},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "per_seed": {n: {str(s): v for s, v in d.items()} for n, d in per_seed.items()},
        "aggregate": agg, "seconds": times,
    }
    write_json(out / "instruments.json", result)
    write_text(out / "instruments.md", table + "\n")
    if args.json:
        write_json(args.json, result)
    return result, table
