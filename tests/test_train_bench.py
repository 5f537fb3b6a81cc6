"""wtours bench train: it runs the training step itself (same weights as training), table + JSON on CPU
(MFU n/a), the GPU peak table."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from test_train_module import FixedClips, make_cfg
from wtours.bench.train import _RepeatBatch, bench_step, peak_flops
from wtours.cli import main


def test_peak_table_by_gpu_name():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA GeForce GTX 1080") is None


def test_bench_weights_equal_training_weights_after_the_same_steps():
    """The bench's N optimizer steps on a batch leave exactly the weights (student, teacher, heads, centre)
    and optimizer state of N training steps on that batch: schedules (lr warm-up), the frozen last layer
    (step 0), per-parameter clipping, gradient accumulation, EMA and centre all included."""
    from wtours.train.trainer_setup import step_options
    from wtours.stages.video.module import VideoModule

    # 8 clips / (2 x 2 accumulated) = 2 steps per epoch: lr warms up over 2 steps, last layer frozen for 1
    cfg = make_cfg("trainer.accumulate_grad_batches=2", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0.5",
                   "optim.clip_grad=0.5", "trainer.max_steps=3")
    fixed = FixedClips()
    clips = torch.stack([fixed[0]["clip"], fixed[1]["clip"]])
    res, benched = bench_step(cfg, clips, steps=2, warmup=0)  # step 0 counted, steps 1-2 timed
    assert res["steps_per_s"] > 0 and res["flops_per_step"] > 0 and res["precision"] == "32-true"

    trained = VideoModule(cfg)
    init = {k: v.clone() for k, v in trained.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, **step_options(cfg, on_gpu=False), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(trained, DataLoader(_RepeatBatch({"clip": clips}), batch_size=None))
    assert benched.ema_updates == trained.ema_updates == 3
    a, b = benched.state_dict(), trained.state_dict()
    assert a.keys() == b.keys() and "objective.dora.dino.center" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(init["student.vit.blocks.0.attn.qkv.weight"], a["student.vit.blocks.0.attn.qkv.weight"])
    assert not torch.equal(init["objective.dora.dino.center"], a["objective.dora.dino.center"])
    opt_a = benched.trainer.optimizers[0].state_dict()["state"]
    opt_b = trainer.optimizers[0].state_dict()["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        assert all(torch.equal(opt_a[i][n], opt_b[i][n]) for n in opt_a[i]), i


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from wtours.video.synth import synthesize

    out = tmp_path_factory.mktemp("v")
    return str(synthesize(out_dir=out, width=160, height=90, fps=10.0, seconds=3.0, sequences=0, progress=False).video)


SETS = ["data.frames_per_clip=2", "data.stride=3", "data.short_side=64", "data.clips_per_epoch=8",
        "data.batch_size=2", "data.num_workers=0", "crops.precrop_size=48", "crops.global_size=32",
        "crops.local_size=16", "crops.local_number=2", "model.arch=vit_tiny_patch16_224", "model.out_dim=128",
        "model.hidden_dim=64", "model.bottleneck_dim=32", "tracking.objects=2", "trainer.accumulate_grad_batches=2",
        "trainer.deterministic=true"]


@pytest.mark.slow
def test_bench_and_pretrain_set_up_the_same_step(tmp_path, video, monkeypatch):
    """``wtours pretrain`` and ``wtours bench train`` give the Trainer the same step-defining options."""
    import wtours.train.trainer_setup as setup
    from wtours.stages.video.run import load_pretrain_config, run_pretrain

    seen = {}
    real = setup.make_trainer

    class Stop(Exception):
        pass

    def recording(world=None, **kwargs):
        seen["bench" if kwargs.get("logger") is False else "pretrain"] = kwargs
        if kwargs.get("logger") is not False:
            raise Stop  # pretrain: the Trainer's arguments are all this test needs
        return real(world, **kwargs)

    monkeypatch.setattr(setup, "make_trainer", recording)
    cfg = load_pretrain_config(None, SETS, videos=[video])
    with pytest.raises(Stop):
        run_pretrain(cfg, tmp_path / "run", progress=False)
    fixed = FixedClips()
    bench_step(cfg, torch.stack([fixed[0]["clip"], fixed[1]["clip"]]), steps=1, warmup=0)
    keys = set(setup.step_options(cfg, on_gpu=False))
    assert keys >= {"precision", "accumulate_grad_batches", "deterministic"}
    assert {k: seen["bench"][k] for k in keys} == {k: seen["pretrain"][k] for k in keys}
    assert seen["pretrain"]["accumulate_grad_batches"] == 2 and seen["pretrain"]["deterministic"] is True
    assert "gradient_clip_val" not in seen["bench"] and "gradient_clip_val" not in seen["pretrain"]


@pytest.mark.slow
def test_bench_train_on_cpu_writes_json(tmp_path, video, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sets = [s for s in SETS if not s.startswith("trainer.")] + [f"videos=[{video}]"]
    rc = main(["bench", "train", "--stage", "video", "--config", "video/tiny", "--steps", "2",
               "--json", str(tmp_path / "b.json"), *sum((["--set", s] for s in sets), [])])
    assert rc == 0
    table = capsys.readouterr().out
    assert "steps/s" in table and "MFU" in table and "n/a" in table and "loader clips/s" in table
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["device"] == "cpu" and res["mfu"] is None and res["precision"] == "32-true"
    assert res["steps_per_s"] > 0 and res["clips_per_s"] == pytest.approx(2 * res["steps_per_s"])
    assert res["flops_per_step"] > 1e8 and res["achieved_tflops"] > 0
    assert res["loader_clips_per_s"] > 0 and res["peak_memory_gib"] > 0
