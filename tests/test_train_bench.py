"""wtours bench train: table + JSON on CPU (MFU n/a), the GPU peak table."""

from __future__ import annotations

import json

import pytest

from wtours.bench.train import peak_flops
from wtours.cli import main


def test_peak_table_by_gpu_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GeForce GTX 1080") is None


@pytest.mark.slow
def test_bench_train_on_cpu_writes_json(tmp_path, monkeypatch, capsys):
    from wtours.video.synth import synthesize

    video = synthesize(out_dir=tmp_path / "v", width=160, height=90, fps=10.0, seconds=3.0, sequences=0,
                       progress=False).video
    monkeypatch.chdir(tmp_path)
    sets = ["data.frames_per_clip=2", "data.stride=3", "data.short_side=64", "data.clips_per_epoch=8",
            "data.batch_size=2", "data.num_workers=0", "crops.precrop_size=48", "crops.global_size=32",
            "crops.local_size=16", "crops.local_number=2", "model.arch=vit_tiny_patch16_224", "model.out_dim=128",
            "model.hidden_dim=64", "model.bottleneck_dim=32", "tracking.objects=2", f"videos=[{video}]"]
    rc = main(["bench", "train", "--stage", "video", "--config", "video/tiny", "--steps", "2",
               "--json", str(tmp_path / "b.json"), *sum((["--set", s] for s in sets), [])])
    assert rc == 0
    table = capsys.readouterr().out
    assert "steps/s" in table and "MFU" in table and "n/a" in table and "loader clips/s" in table
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["device"] == "cpu" and res["mfu"] is None
    assert res["steps_per_s"] > 0 and res["clips_per_s"] == pytest.approx(2 * res["steps_per_s"])
    assert res["flops_per_step"] > 1e8 and res["achieved_tflops"] > 0
    assert res["loader_clips_per_s"] > 0 and res["peak_memory_gib"] > 0
