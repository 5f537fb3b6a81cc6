"""wtours bench neco: the table, and the memory claim (lean sorter <= half the naive one at the same batch)."""

from __future__ import annotations

import json

import pytest

from wtours.bench.neco import bench_loss, format_table
from wtours.cli import main


def test_table_reports_lean_over_naive_ratios():
    rows = [{"sorter": "bitonic", "impl": "naive", "rows": 10, "n": 49, "loss_ms": 5.0, "loss_peak_bytes": 4 << 20,
             "loss_saved_bytes": 3 << 20, "step_ms": 9.0, "step_peak_bytes": 8 << 20},
            {"sorter": "bitonic", "impl": "lean", "rows": 10, "n": 49, "loss_ms": 4.0, "loss_peak_bytes": 1 << 20,
             "loss_saved_bytes": 1 << 10, "step_ms": 8.0, "step_peak_bytes": 4 << 20},
            {"sorter": "torchsort", "impl": "torchsort", "error": "ImportError: no torchsort"}]
    table = format_table(rows)
    assert "| bitonic | lean | 10 x 49 | 4 | 1.0 | 0.0 | 8 | 4.0 | 0.25, 0.50 |" in table
    assert "error: ImportError" in table


def test_saved_activations_lean_vs_naive_at_the_same_batch():
    import torch

    naive = bench_loss("bitonic", "naive", rows=98, n=49, steps=1, device=torch.device("cpu"))
    lean = bench_loss("bitonic", "lean", rows=98, n=49, steps=1, device=torch.device("cpu"))
    assert naive["loss_saved_bytes"] > 100 * lean["loss_saved_bytes"]
    assert lean["loss_ms"] > 0


@pytest.mark.slow
def test_bench_neco_on_cpu_prints_both_and_lean_peaks_at_most_half(tmp_path, capsys):
    rc = main(["bench", "neco", "--sorters", "bitonic", "--batch", "1", "--steps", "1",
               "--json", str(tmp_path / "b.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| bitonic | naive |" in out and "| bitonic | lean |" in out
    res = {r["impl"]: r for r in json.loads((tmp_path / "b.json").read_text())["results"]}
    assert set(res) == {"naive", "autograd", "lean"} and not any("error" in r for r in res.values())
    assert res["lean"]["rows"] == 10 * 49
    assert res["lean"]["step_ms"] > 0 and "step_ms" not in res["autograd"]
    if res["lean"]["loss_peak_bytes"] is None:
        pytest.skip("no /proc peak-memory probe here")
    assert res["lean"]["loss_peak_bytes"] <= 0.5 * res["naive"]["loss_peak_bytes"]
    assert res["lean"]["step_peak_bytes"] <= 0.5 * res["naive"]["step_peak_bytes"]
