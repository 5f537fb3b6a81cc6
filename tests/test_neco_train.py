"""wtours neco end to end on CPU: from a stage-1 backbone, artefacts, eval on the output, exact kill-and-resume,
skipped images, user errors."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from test_train_pretrain import _killer, _Kill
from wtours.cli import main
from wtours.stages.neco.run import load_neco_config, run_neco

MICRO = [
    "data.frames=24", "data.frame_short_side=36", "data.image_size=48", "data.batch_size=4", "data.num_workers=0",
    "crops.global_size=32", "crops.local_size=16",
    "model.head_hidden_dim=64", "model.head_out_dim=32",
    "loss.roi_size=3", "loss.queue_length=128",
    "optim.lr_backbone=1e-4", "optim.lr_head=1e-3", "optim.momentum_teacher=0.99",
    "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.log_every=1", "trainer.cpu_threads=1",
    "log.picture_every=2", "log.progress=false", "log.tensorboard=false",
]


def _sets(items):
    return sum((["--set", s] for s in items), [])


def test_module_teacher_is_a_frozen_copy_with_its_head_and_two_learning_rates():
    from wtours.models.weights import load_init
    from wtours.stages.neco.module import NeCoModule

    cfg = load_neco_config("neco/tiny", [])
    w = load_init("random:vit_nano_patch8_64")
    m = NeCoModule(cfg, w.arch, w.state_dict, steps_per_epoch=10)
    s, t = m.student.state_dict(), m.teacher.state_dict()
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)  # head included
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert torch.equal(s["vit.blocks.0.attn.qkv.weight"], w.state_dict["blocks.0.attn.qkv.weight"])
    opt = m.configure_optimizers()
    by_key = {(g["lr_key"], g["apply_wd"]): g for g in opt.param_groups}
    assert by_key[("lr_backbone", True)]["lr"] == pytest.approx(cfg.optim.lr_backbone)
    assert by_key[("lr_head", True)]["lr"] == pytest.approx(cfg.optim.lr_head)
    assert by_key[("lr_head", False)]["weight_decay"] == 0.0
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in m.student.parameters())
    sched = m.schedules
    assert sched.total_steps == cfg.trainer.max_steps
    assert float(sched.momentum[0]) == pytest.approx(cfg.optim.momentum_teacher)
    assert float(sched.wd[-1]) > float(sched.wd[0])




@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A real stage-1 run (a few DoRA steps of vit_nano_patch8_64 on a synthetic tour) -> (backbone, video, davis)."""
    from wtours.stages.video.run import load_pretrain_config, run_pretrain
    from wtours.video.synth import synthesize

    root = tmp_path_factory.mktemp("stage1")
    synth = synthesize(out_dir=root / "synth", width=160, height=90, fps=10.0, seconds=3.0, sequences=2,
                       seq_frames=3, progress=False)
    ov = ["data.frames_per_clip=2", "data.stride=3", "data.short_side=64", "data.clips_per_epoch=8",
          "data.batch_size=2", "data.num_workers=0", "crops.precrop_size=48", "crops.global_size=32",
          "crops.local_size=16", "crops.local_number=2", "model.arch=vit_nano_patch8_64", "model.out_dim=64",
          "model.hidden_dim=64", "model.bottleneck_dim=32", "tracking.objects=2", "tracking.sinkhorn_iters=3",
          "trainer.max_steps=2", "trainer.checkpoint_every=2", "trainer.log_every=1", "log.picture_every=0", "log.progress=false",
          "log.tensorboard=false"]
    run_pretrain(load_pretrain_config(None, ov, videos=[str(synth.video)]), root / "run", progress=False)
    return str(root / "run" / "stage1" / "backbone.pt"), str(synth.video), str(root / "synth" / "davis")


def _ckpt(run_dir):
    return torch.load(run_dir / "stage2" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_cli_run_from_a_stage1_backbone_exports_an_evaluable_backbone(tmp_path, stage1, capsys):
    backbone, video, davis = stage1
    out = tmp_path / "run"
    args = ["neco", "--init", backbone, "--frames-from", video, "--out", str(out), "--config", "neco/tiny",
            *_sets(MICRO)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "loss: first" in printed and "after 4 steps" in printed and "student-teacher KL" in printed
    for rel in ("config_neco.yaml", "report.md", "stage2/last.ckpt", "stage2/metrics.csv", "stage2/backbone.pt",
                "stage2/frames/frames.npy", "stage2/pictures/pca_step000002.png", "stage2/pictures/pca_step000004.png"):
        assert (out / rel).is_file(), rel
    import timm

    import wtours.models  # noqa: F401 - registers vit_nano_patch8_64

    bb = torch.load(out / "stage2" / "backbone.pt", map_location="cpu", weights_only=True)
    assert bb["arch"] == "vit_nano_patch8_64" and bb["meta"]["stage"] == "neco" and bb["meta"]["steps"] == 4
    timm.create_model(bb["arch"], num_classes=0).load_state_dict(bb["state_dict"], strict=True)
    ck = _ckpt(out)
    sd = ck["state_dict"]
    assert ck["global_step"] == 4
    assert torch.equal(bb["state_dict"]["blocks.0.attn.qkv.weight"], sd["student.vit.blocks.0.attn.qkv.weight"])
    init = torch.load(backbone, map_location="cpu", weights_only=True)["state_dict"]
    assert not torch.equal(init["blocks.0.attn.qkv.weight"], bb["state_dict"]["blocks.0.attn.qkv.weight"])  # trained
    rows = list(csv.DictReader(open(out / "stage2" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 2, 3]
    for r in rows:
        if r.get("train/loss"):
            loss, ent, kl = float(r["train/loss"]), float(r["train/teacher_entropy"]), float(r["train/kl"])
            assert kl == pytest.approx(loss - ent, abs=1e-4) and kl > -1e-4  # cross-entropy >= entropy
    assert "stage2" in (out / "report.md").read_text()
    # the stage-2 backbone is evaluated like any other
    assert main(["eval", "clustering", "--dataset", "davis", "--root", davis, "--checkpoint",
                 str(out / "stage2" / "backbone.pt"), "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    capsys.readouterr()
    # the same command again continues the finished run: nothing retrained
    assert main(args) == 0
    assert "holds a stage-2 run: continuing it" in capsys.readouterr().err
    assert _ckpt(out)["global_step"] == 4
    assert main([*args, "--max-steps", "2"]) == 2  # another schedule is another run
    assert "trainer.max_steps: 4 -> 2" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_and_resume_reaches_the_uninterrupted_state(tmp_path, stage1):
    backbone, video, _ = stage1

    def cfg():
        return load_neco_config("neco/tiny", MICRO, init=backbone, frames_from=[video])

    straight = tmp_path / "straight"
    run_neco(cfg(), straight, progress=False)
    killed = tmp_path / "killed"
    with pytest.raises(_Kill):
        run_neco(cfg(), killed, progress=False, extra_callbacks=[_killer(2)])
    assert not (killed / "stage2" / "backbone.pt").exists() and _ckpt(killed)["global_step"] == 2
    from lightning.pytorch.callbacks import Callback

    class Count(Callback):
        steps: list = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.steps.append(trainer.global_step)

    counter = Count()
    summary = run_neco(cfg(), killed, resume="last", progress=False, extra_callbacks=[counter])
    assert summary["steps"] == 4 and counter.steps == [2, 3]  # continued, not retrained
    a, b = _ckpt(straight), _ckpt(killed)
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys() and "neco.queue" in a["state_dict"]
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k].float(), b["state_dict"][k].float(), rtol=1e-5, atol=1e-6), k
    assert a["wtours"]["queue_counters"] == b["wtours"]["queue_counters"]
    steps = [int(r["step"]) for r in csv.DictReader(open(killed / "stage2" / "metrics.csv")) if r.get("train/loss")]
    assert steps == [0, 1, 2, 3]


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_counted(tmp_path, stage1, capsys):
    import numpy as np
    from PIL import Image

    backbone = stage1[0]
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 60, 3), dtype=np.uint8)).save(images / "sub" / f"{i}.png")
    for i in range(4):
        (images / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "run"
    rc = main(["neco", "--init", backbone, "--images", str(images), "--out", str(out), "--config", "neco/tiny",
               *_sets([*MICRO, "trainer.max_steps=2"])])
    assert rc == 0
    err = capsys.readouterr().err
    import re

    assert re.search(r"warning: skipped \d+ unreadable image\(s\) so far \(e\.g\. .*bad\d\.jpg", err), err
    assert "skipped" in err.splitlines()[-1]  # and a summary at the end
    meta = torch.load(out / "stage2" / "backbone.pt", map_location="cpu", weights_only=True)["meta"]
    assert meta["skipped_images"] >= 2  # 8 draws from 10 files of which 4 are broken


def _one_line_error(capsys, argv, *needles):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


@pytest.mark.slow
def test_user_errors_exit_2_with_one_line(tmp_path, stage1, capsys, monkeypatch):
    backbone, video, _ = stage1
    out = str(tmp_path / "run")
    base = ["neco", "--out", out, "--config", "neco/tiny", *_sets(MICRO)]
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, [*base, "--init", backbone, "--images", str(empty)], str(empty), "no images")
    _one_line_error(capsys, [*base, "--init", "random:resnet18", "--frames-from", video], "--init", "not a ViT")
    _one_line_error(capsys, [*base, "--init", backbone, "--frames-from", video, "--set", "crops.min_overlap=0.3"],
                    "crops.min_overlap", "cannot be met")
    _one_line_error(capsys, [*base, "--init", backbone, "--frames-from", video, "--set", "crops.local_size=12"],
                    "crops.local_size", "patch size 8")
    _one_line_error(capsys, [*base, "--init", backbone], "--images", "--frames-from")
    _one_line_error(capsys, [*base, "--frames-from", video], "--init")
    monkeypatch.setitem(sys.modules, "torchsort", None)
    _one_line_error(capsys, [*base, "--init", backbone, "--frames-from", video, "--set", "loss.sorter=torchsort"],
                    "loss.sorter", "torchsort")
    assert not (tmp_path / "run" / "stage2" / "last.ckpt").exists()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_keeps_the_queues_identical(tmp_path, stage1):
    """DDP (gloo, 2 ranks): each rank reads its own shard, every rank pushes both ranks' patches, rank 0 exports."""
    import subprocess

    backbone, video, _ = stage1
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "wtours.cli", "neco", "--init", backbone, "--frames-from", video, "--out", str(out),
           "--config", "neco/tiny", "--devices", "2", *_sets([*MICRO, "trainer.accelerator=cpu"])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = torch.load(out / "stage2" / "backbone.pt", map_location="cpu", weights_only=True)["meta"]
    assert meta["steps"] == 4 and meta["images_seen"] == 4 * 2 * 4  # steps x world x batch
    counters = _ckpt(out)["wtours"]["queue_counters"]
    pushed = 4 * 2 * 10 * 4  # steps x ranks x queue_push_per_image x batch
    assert counters == {"ptr": [pushed % 128] * 2, "filled": [min(pushed, 128)] * 2}


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["video", "images"])
def test_fresh_checks_the_data_before_it_sets_the_old_run_aside(tmp_path, stage1, capsys, bad):
    """Issue 20 #4, stage 2: `neco --fresh` with bad data must leave the finished run as it was."""
    backbone, video, _ = stage1
    out = tmp_path / "run"
    base = ["neco", "--init", backbone, "--out", str(out), "--config", "neco/tiny", *_sets(MICRO)]
    assert main([*base, "--frames-from", video]) == 0
    old = {p.name: p.read_bytes() for p in (out / "stage2").iterdir() if p.is_file()}
    capsys.readouterr()
    text = tmp_path / "text.mp4"
    text.write_text("not a video\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    data = ["--frames-from", str(text)] if bad == "video" else ["--images", str(empty)]
    _one_line_error(capsys, [*base, *data, "--fresh"], "wtours neco: error: ", str(text if bad == "video" else empty))
    assert not list(out.glob("stage2.old-*"))
    assert {p.name: p.read_bytes() for p in (out / "stage2").iterdir() if p.is_file()} == old
