"""The one-call GPU check (scripts/gpu_check.sh): its dry mode runs every phase on CPU at toy sizes, so the
script cannot rot between the rare runs on a GPU; its summary is written whatever failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check_summary  # noqa: E402

PHASES = ["env", "cuda_tests", "bench_train_proof", "bench_train_proof_dora_timet", "learn_calibration", "learn",
          "bench_neco", "bench_eval", "suite"]


@pytest.mark.slow
def test_dry_run_runs_every_phase_and_writes_the_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(out), "GPU_CHECK_WORK": str(work), "PY": sys.executable}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    phases = dict(ln.split()[:2] for ln in (work / "results" / "phases.txt").read_text().splitlines())
    assert list(phases) == PHASES
    # no CUDA here: the cuda-marked tests are skipped (0) or none is selected (5); every other phase succeeds
    assert phases.pop("cuda_tests") in ("0", "5")
    assert set(phases.values()) == {"0"}, phases
    # what comes back from the device: the archive (every phase's files), the summary and the log
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz", "log.txt", "summary.md"]
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"env.json", "bench_train_proof.json", "learn.json", "bench_neco.json", "bench_eval.json",
            "suite.txt", "summary.md"} <= names
    # the learning run: steps derived from the calibration, 3 seeds, cut by --time-limit or not, evaluated
    learn = json.loads((work / "results" / "learn.json").read_text())
    assert sorted(learn["runs"]) == ["0", "1", "2"]
    for run in learn["runs"].values():
        assert 1 <= run["steps"] <= run["planned_steps"] <= 3
        assert run["stopped_by_time"] == (run["steps"] < run["planned_steps"])
    assert learn["settings"]["pretrain_config"]["data"]["batch_size"] == 2
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    assert "| video/proof | vit_nano_patch8_64 | 2 x 4 |" in summary
    assert "| video/proof_dora_timet | vit_nano_patch8_64 | 2 x 4 |" in summary
    assert "| davis | F |" in summary and "| ytvos | C |" in summary
    assert "| bitonic | lean |" in summary
    suite = next(ln for ln in summary.splitlines() if ln.startswith("| whole suite with CUDA present |"))
    assert " passed" in suite and "failed" not in suite
    assert "(no result" not in summary


def test_summary_names_what_is_missing(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H200", "cuda": True, "memory_gib": 139.8,
                                                  "bf16": True, "torch": "2.11.0", "modules": {"av": "18.1.0"}}))
    (tmp_path / "phases.txt").write_text("env 0 12\ncuda_tests 1 40\nbench_train_dora_vits16 124 130\n")
    (tmp_path / "cuda_tests.txt").write_text("FAILED tests/test_x.py::test_y - boom\n1 failed, 1 passed in 3.0s\n")
    (tmp_path / "bench_train_dora_vits16.json").write_text("{not json")
    (tmp_path / "bench_train_dora_timet_vits16.json").write_text(json.dumps(
        {"config": "video/dora_timet_vits16", "arch": "vit_small_patch16_224", "batch_size": 16, "frames_per_clip": 8,
         "precision": "bf16-mixed", "steps_per_s": 2.5, "clips_per_s": 40.0, "flops_per_step": 3.0e13,
         "achieved_tflops": 75.0, "mfu": 0.0758, "peak_memory_gib": 41.2, "loader_clips_per_s": 60.0}))
    text = gpu_check_summary.summary(tmp_path, dry=False)
    assert "DRY" not in text and "**NVIDIA H200** (140 GiB, bf16 True)" in text
    assert "| cuda_tests | 1 | 40 |" in text and "| bench_train_dora_vits16 | 124 | 130 |" in text
    assert "| CUDA-marked tests (`-m cuda`) | 1 failed, 1 passed in 3.0s |" in text
    assert "- `FAILED tests/test_x.py::test_y - boom`" in text
    assert "| whole suite with CUDA present | not run |" in text
    assert "| dora_vits16 | failed (see bench_train_dora_vits16.log) |" in text
    assert ("| video/dora_timet_vits16 | vit_small_patch16_224 | 16 x 8 | bf16-mixed | 2.500 | 40.0 | 30000.0 | "
            "75.00 | 7.6% | 41.20 | 60.0 |") in text
    assert "the combined table is missing; 0 of 3 seeds" in text
    assert "(no result; see bench_neco.log)" in text and "(no result; see bench_eval.log)" in text


def test_summary_learn_section_reads_a_proof_json(tmp_path):
    agg = {"davis": {"F": {"random": {"mean": 17.0, "std": 0.5}, "trained": {"mean": 30.0, "std": 1.0},
                           "diff": 13.0, "separation": 16.4}}}
    (tmp_path / "learn.json").write_text(json.dumps({
        "runs": {"0": {"steps": 900, "planned_steps": 1000, "stopped_by_time": True},
                 "1": {"steps": 1000, "planned_steps": 1000, "stopped_by_time": False}},
        "settings": {"pretrain_config": {"data": {"batch_size": 128}}}, "aggregates": agg,
        "goals": {"davis": {"text": "davis: goal: met"}}, "wall_s": {"this_invocation": 12.0}}))
    text = gpu_check_summary.summary(tmp_path, dry=False)
    assert "- seed 0: 900 steps (stopped by its time limit; 1000 planned) x 128 clips = 115200 clips (96.0x" in text
    assert "- seed 1: 1000 steps x 128 clips = 128000 clips (106.7x" in text
    assert "| davis | F | 17.00 ± 0.50 | 30.00 ± 1.00 | +13.00 | 16.4 |" in text
    assert "- davis: goal: met" in text
