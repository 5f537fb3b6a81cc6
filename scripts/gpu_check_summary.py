"""The summary table of `scripts/gpu_check.sh`: every figure of its phases in one markdown page.

    python scripts/gpu_check_summary.py RESULTS_DIR [--dry 0|1] > summary.md

RESULTS_DIR holds what the phases wrote (env.json, phases.txt, bench_train_*.json, learn_calibration.json,
learn_plan.txt, learn.json, bench_neco.json, bench_eval.json, cuda_tests.txt, suite.txt). A phase whose
files are missing is listed as such: the page is written whatever failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path
from typing import Any

CPU_PROOF_CLIPS = 300 * 4  # `make proof` on CPU: 300 steps x 4 clips per seed


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num(v: Any, fmt: str = ".2f", scale: float = 1.0) -> str:
    return "n/a" if not isinstance(v, (int, float)) else format(v * scale, fmt)


def _pytest_line(path: Path) -> str:
    """The closing line of a pytest run ('12 passed, 1 skipped in 3.2s'), or why there is none."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "not run"
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", ln) and " in " in ln:
            return ln.strip("= ")
    return "no closing line (cut by its time limit?)"


def _failures(path: Path, limit: int = 15) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))][:limit]


def section_env(d: Path, dry: bool) -> list[str]:
    env = _json(d / "env.json") or {}
    mods = env.get("modules") or {}
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# wtours GPU check{' (DRY RUN on CPU: toy sizes, not GPU figures)' if dry else ''}", "",
             f"- date: {when}; device: **{env.get('device', '?')}**"
             + (f" ({_num(env.get('memory_gib'), '.0f')} GiB, bf16 {env.get('bf16')})" if env.get("cuda") else ""),
             f"- python {env.get('python', '?')}, torch {env.get('torch', '?')} (CUDA {env.get('cuda_version')})",
             "- modules: " + ", ".join(f"{k} {v}" for k, v in mods.items())]
    try:
        phases = [ln.split() for ln in (d / "phases.txt").read_text().splitlines() if ln.strip()]
    except OSError:
        phases = []
    lines += ["", "| phase | exit status | ended at (s) |", "|---|---:|---:|"]
    lines += [f"| {p[0]} | {p[1]} | {p[2]} |" for p in phases if len(p) == 3]
    return lines


def section_tests(d: Path) -> list[str]:
    lines = ["", "## Tests", "", "| run | result |", "|---|---|",
             f"| CUDA-marked tests (`-m cuda`) | {_pytest_line(d / 'cuda_tests.txt')} |",
             f"| whole suite with CUDA present | {_pytest_line(d / 'suite.txt')} |"]
    fails = _failures(d / "cuda_tests.txt") + _failures(d / "suite.txt")
    if fails:
        lines += ["", "Failures:", "", *[f"- `{f}`" for f in fails]]
    return lines


def section_bench_train(d: Path) -> list[str]:
    lines = ["", "## Training step (`wtours bench train`)", "",
             "| config | arch | batch (clips x frames) | precision | steps/s | clips/s | GFLOP/step | TFLOP/s | MFU | "
             "peak memory GiB | loader clips/s |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    files = sorted(d.glob("bench_train_*.json"))
    for f in files:
        r = _json(f)
        if not isinstance(r, dict):
            lines.append(f"| {f.stem[12:]} | failed (see {f.stem}.log) |||||||||||")
            continue
        lines.append(f"| {r.get('config')} | {r.get('arch')} | {r.get('batch_size')} x {r.get('frames_per_clip')} | "
                     f"{r.get('precision')} | {_num(r.get('steps_per_s'), '.3f')} | {_num(r.get('clips_per_s'), '.1f')} | "
                     f"{_num(r.get('flops_per_step'), '.1f', 1e-9)} | {_num(r.get('achieved_tflops'), '.2f')} | "
                     f"{_num(r.get('mfu'), '.1f', 100)}{'%' if isinstance(r.get('mfu'), (int, float)) else ''} | "
                     f"{_num(r.get('peak_memory_gib'))} | {_num(r.get('loader_clips_per_s'), '.1f')} |")
    if not files:
        lines.append("| (no result) |||||||||||")
    return lines


def section_learn(d: Path) -> list[str]:
    lines = ["", "## GPU-scale learning proof (`wtours bench learn`, 3 seeds in parallel on the one GPU)", ""]
    cal = _json(d / "learn_calibration.json") or {}
    try:
        plan = (d / "learn_plan.txt").read_text().strip().splitlines()
    except OSError:
        plan = []
    lines += [f"- calibration (single process, fixed batch): {_num(cal.get('steps_per_s'), '.2f')} steps/s, "
              f"loader {_num(cal.get('loader_clips_per_s'), '.0f')} clips/s, batch {cal.get('batch_size')}"]
    lines += [f"- {p}" for p in plan]
    res = _json(d / "learn.json")
    if not isinstance(res, dict):
        parts = [_json(d / f"learn_seed{s}.json") for s in range(3)]
        done = [p for p in parts if isinstance(p, dict)]
        lines.append(f"- the combined table is missing; {len(done)} of 3 seeds wrote their own (learn_seed*.json)")
        if not done:
            return lines
        res = done[-1]
    runs = res.get("runs") or {}
    batch = ((res.get("settings") or {}).get("pretrain_config") or {}).get("data", {}).get("batch_size")
    for s, r in sorted(runs.items()):
        steps = r.get("steps")
        clips = steps * batch if isinstance(steps, int) and isinstance(batch, int) else None
        cut = f" (stopped by its time limit; {r.get('planned_steps')} planned)" if r.get("stopped_by_time") else ""
        lines.append(f"- seed {s}: {steps} steps{cut} x {batch} clips = {clips} clips "
                     f"({_num(clips / CPU_PROOF_CLIPS if clips else None, '.1f')}x the CPU proof's {CPU_PROOF_CLIPS})")
    wall = (res.get("wall_s") or {}).get("this_invocation")
    lines += [f"- wall time of the last invocation: {_num(wall, '.0f')} s", ""]
    agg = res.get("aggregates") or {}
    lines += ["| set | metric | random init | trained | trained − random | separation (std) |",
              "|---|---|---:|---:|---:|---:|"]

    def ms(x: dict) -> str:
        return f"{x['mean']:.2f} ± {x['std']:.2f}" if x.get("std") is not None else f"{x['mean']:.2f}"

    for ds, metrics in agg.items():
        for name, r in metrics.items():
            if not isinstance(r, dict) or "trained" not in r:
                continue
            sep = r.get("separation")
            lines.append(f"| {ds} | {name} | {ms(r['random'])} | {ms(r['trained'])} | {r['diff']:+.2f} | "
                         f"{'n/a' if sep is None else f'{sep:.1f}'} |")
    for v in (res.get("goals") or {}).values():
        if isinstance(v, dict) and v.get("text"):
            lines.append(f"- {v['text']}")
    return lines


def section_neco(d: Path) -> list[str]:
    lines = ["", "## NeCo step and sorters (`wtours bench neco`)", ""]
    r = _json(d / "bench_neco.json")
    if not isinstance(r, dict):
        return lines + ["(no result; see bench_neco.log)"]
    from wtours.bench.neco import format_table

    lines += [f"{r.get('device')}; {r.get('arch')}; batch {r.get('batch')}; config {r.get('config')}", "",
              format_table(r.get("results") or [])]
    return lines


def section_eval(d: Path) -> list[str]:
    lines = ["", "## Clustering evaluation speed (`wtours bench eval`, DAVIS-sized synthetic set)", ""]
    r = _json(d / "bench_eval.json")
    if not isinstance(r, dict):
        return lines + ["(no result; see bench_eval.log)"]
    total = r.get("eval_total_s")
    lines += ["| frames | features s (frames/s) | clustering + matching s | whole evaluation s | goal |",
              "|---:|---:|---:|---:|---|",
              f"| {r.get('frames')} | {_num(r.get('features_s'))} ({_num(r.get('features_frames_per_s'), '.0f')}) | "
              f"{_num(r.get('clustering_total_s'))} | {_num(total)} | <= 60 s: "
              f"{'met' if isinstance(total, (int, float)) and total <= 60 else 'not met'} |"]
    return lines


def summary(d: Path, dry: bool) -> str:
    parts = section_env(d, dry) + section_tests(d) + section_bench_train(d) + section_learn(d)
    parts += section_neco(d) + section_eval(d)
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--dry", default="0")
    a = ap.parse_args(argv)
    sys.stdout.write(summary(a.results, a.dry not in ("0", "", "false")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
