"""wtours pretrain end to end on CPU: artefacts, timm-loadable backbone, exact kill-and-resume, errors."""

from __future__ import annotations

import csv

import pytest
import torch

from wtours.cli import main
from wtours.stages.video.run import load_pretrain_config, run_pretrain

pytestmark = pytest.mark.slow

# A very small run: 2-frame clips of 160x90 video, ViT-tiny at 32 px (2x2 patches).
MICRO = [
    "data.frames_per_clip=2", "data.stride=3", "data.short_side=64", "data.clips_per_epoch=12",
    "data.batch_size=2", "data.num_workers=0",
    "crops.precrop_size=48", "crops.global_size=32", "crops.local_size=16", "crops.local_number=2",
    "model.arch=vit_tiny_patch16_224", "model.out_dim=128", "model.hidden_dim=64", "model.bottleneck_dim=32",
    "tracking.objects=2", "tracking.sinkhorn_iters=5",
    "optim.lr=0.002", "optim.lr_batch_reference=2", "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0.25",
    "trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.log_every=1",
    "log.picture_every=2", "log.progress=false", "log.tensorboard=false",
]


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from wtours.video.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    return str(synthesize(out_dir=out, width=160, height=90, fps=10.0, seconds=3.0, sequences=0, progress=False).video)


def _weights(run_dir):
    ck = torch.load(run_dir / "stage1" / "last.ckpt", map_location="cpu", weights_only=True)
    return ck["state_dict"], ck["global_step"]


def test_cli_run_writes_artefacts_and_a_timm_loadable_backbone(tmp_path, video, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", "video/default", "--video", video, "--out", str(out), *sum((["--set", s] for s in MICRO), [])])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "loss: first" in printed and "after 4 steps" in printed
    for rel in ("config.yaml", "report.md", "stage1/last.ckpt", "stage1/metrics.csv", "stage1/backbone.pt",
                "stage1/pictures/masks_step000002.png", "stage1/pictures/masks_step000004.png"):
        assert (out / rel).is_file(), rel
    import timm

    ck = torch.load(out / "stage1" / "backbone.pt", map_location="cpu", weights_only=True)
    assert ck["arch"] == "vit_tiny_patch16_224" and ck["meta"]["steps"] == 4
    model = timm.create_model(ck["arch"], num_classes=0)
    model.load_state_dict(ck["state_dict"], strict=True)
    # the exported weights are the teacher's
    sd, step = _weights(out)
    assert step == 4
    assert torch.equal(ck["state_dict"]["blocks.0.attn.qkv.weight"], sd["teacher.vit.blocks.0.attn.qkv.weight"])
    rows = list(csv.DictReader(open(out / "stage1" / "metrics.csv")))
    steps_with_loss = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps_with_loss == [0, 1, 2, 3]
    assert "student-teacher KL" in printed
    for r in rows:  # the logged KL is the cross-entropy minus the teacher's entropy
        if r.get("train/kl"):
            kl, ce, ent = float(r["train/kl"]), float(r["train/loss"]), float(r["train/teacher_entropy"])
            assert kl == pytest.approx(ce - ent, abs=1e-4) and kl > -1e-4
    from PIL import Image

    im = Image.open(out / "stage1" / "pictures" / "masks_step000004.png")
    assert im.size[0] >= 2 * 128 and im.size[1] >= 2 * 128  # 2 frames of 32 px shown at >= 128 px in a row; 2 rows
    assert "stage1" in (out / "report.md").read_text()


def test_rerunning_into_a_run_directory_continues_it_and_fresh_starts_over(tmp_path, video, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--config", "video/default", "--video", video, "--out", str(out), *sum((["--set", s] for s in MICRO), [])]
    assert main(args) == 0
    sd, _ = _weights(out)
    capsys.readouterr()
    # the same command again continues the (finished) run: nothing retrained, history kept, re-exported
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "holds a run: continuing it" in captured.err and "after 4 steps" in captured.out
    sd_again, step = _weights(out)
    assert step == 4 and all(torch.equal(sd[k], sd_again[k]) for k in sd)
    rows = [int(r["step"]) for r in csv.DictReader(open(out / "stage1" / "metrics.csv")) if r.get("train/loss")]
    assert rows == [0, 1, 2, 3]
    # another schedule is another run: refused with the way out named; --fresh starts over
    assert main([*args, "--max-steps", "2"]) == 2
    assert "trainer.max_steps: 4 -> 2" in capsys.readouterr().err
    assert main([*args, "--max-steps", "2", "--fresh"]) == 0
    assert _weights(out)[1] == 2
    assert main([*args, "--fresh", "--resume"]) == 2
    assert "contradict" in capsys.readouterr().err


class _Kill(RuntimeError):
    pass


def _killer(at_step):
    from lightning.pytorch.callbacks import Callback

    class Killer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= at_step:
                raise _Kill(f"killed at step {trainer.global_step}")

    return Killer()


@pytest.mark.parametrize("accumulate", [2])  # accumulation + resume; accumulate=1 runs in the CLI test
def test_kill_and_resume_reaches_the_uninterrupted_state(tmp_path, video, accumulate):
    ov = [*MICRO, f"trainer.accumulate_grad_batches={accumulate}"]
    straight = tmp_path / "straight"
    run_pretrain(load_pretrain_config(None, ov, videos=[video]), straight, progress=False)
    killed = tmp_path / "killed"
    with pytest.raises(_Kill):
        run_pretrain(load_pretrain_config(None, ov, videos=[video]), killed, progress=False,
                     extra_callbacks=[_killer(2)])  # mid-epoch (3 or 6 steps per epoch)
    assert not (killed / "stage1" / "backbone.pt").exists()
    assert _weights(killed)[1] == 2
    loads = []  # every torch.load of the resume (ours and Lightning's, through AtomicCheckpointIO) is weights_only
    real_load = torch.load

    def recording_load(*a, **k):
        loads.append(k.get("weights_only"))
        return real_load(*a, **k)

    torch.load = recording_load
    try:
        summary = run_pretrain(load_pretrain_config(None, ov, videos=[video]), killed, resume="last", progress=False)
    finally:
        torch.load = real_load
    assert len(loads) >= 2 and all(w is True for w in loads), loads
    assert summary["steps"] == 4
    a, sa = _weights(straight)
    b, sb = _weights(killed)
    assert sa == sb == 4
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k
    # metrics of the resumed run continue the file without duplicates
    rows = list(csv.DictReader(open(killed / "stage1" / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == [0, 1, 2, 3]


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_user_errors_exit_2_with_one_line(tmp_path, video, capsys):
    rc, err = _err(capsys, ["pretrain", "--config", "video/default", "--video", video, "--out", str(tmp_path / "a"), "--set", "optim.lrr=1"])
    assert rc == 2 and len(err) == 1 and "unknown config key 'optim.lrr'" in err[0] and "min_lr" in err[0]
    rc, err = _err(capsys, ["pretrain", "--config", "video/default", "--video", video, "--out", str(tmp_path / "a"), "--set", "data.batch_size=x"])
    assert rc == 2 and len(err) == 1 and "data.batch_size" in err[0]
    rc, err = _err(capsys, ["pretrain", "--config", "video/default", "--video", video, "--out", str(tmp_path / "a"), "--resume"])
    assert rc == 2 and len(err) == 1 and "last.ckpt" in err[0] and "not found" in err[0]
    rc, err = _err(capsys, ["pretrain", "--config", "video/default", "--video", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "a")])
    assert rc == 2 and len(err) == 1 and "missing.mp4" in err[0]
    # a clip longer than the video (30 frames)
    rc, err = _err(capsys, ["pretrain", "--config", "video/default", "--video", video, "--out", str(tmp_path / "b"),
                            *sum((["--set", s] for s in MICRO), []), "--set", "data.stride=100"])
    assert rc == 2 and len(err) == 1 and "too short" in err[0]
    rc, err = _err(capsys, ["pretrain", "--config", "video/default", "--video", video, "--out", str(tmp_path / "c"), "--set", "crops.global_size=40"])
    assert rc == 2 and len(err) == 1 and "patch size" in err[0]


def test_resume_with_another_config_is_refused(tmp_path, video, capsys):
    out = tmp_path / "run"
    sets = sum((["--set", s] for s in MICRO), [])
    assert main(["pretrain", "--config", "video/default", "--video", video, "--out", str(out), *sets, "--max-steps", "3"]) == 0
    capsys.readouterr()
    rc, err = _err(capsys, ["pretrain", "--config", "video/default", "--video", video, "--out", str(out), *sets, "--max-steps", "3",
                            "--set", "optim.lr=0.1", "--resume"])
    assert rc == 2 and len(err) == 1 and "another config" in err[0] and "optim.lr" in err[0]


def test_cuda_out_of_memory_names_the_settings_to_lower(tmp_path, video, monkeypatch, capsys):
    import wtours.stages.video.run as pretrain

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pretrain, "run_pretrain", oom)
    rc, err = _err(capsys, ["pretrain", "--config", "video/default", "--video", video, "--out", str(tmp_path / "a")])
    assert rc == 2 and len(err) == 1
    assert "CUDA out of memory" in err[0] and "data.batch_size=16" in err[0] and "crops.local_number" in err[0]
    assert "model.arch" in err[0]


def test_ddp_on_two_cpu_processes(tmp_path, video):
    """DDP (gloo, 2 ranks) runs end to end: each rank trains on its own shard, rank 0 exports."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "wtours.cli", "pretrain", "--config", "video/default", "--video", video, "--out", str(out), "--devices", "2",
           *sum((["--set", s] for s in MICRO), []), "--set", "trainer.accelerator=cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "CPU processes" in ln]
    assert lines == ["pretrain: running 2 CPU processes (DDP, gloo); the learning rate scales with the 2x larger "
                     "total batch: peak lr 0.004 (optim.lr 0.002 x 4 clips/step / optim.lr_batch_reference 2)"]
    meta = torch.load(out / "stage1" / "backbone.pt", map_location="cpu", weights_only=True)["meta"]
    assert meta["steps"] == 4 and meta["clips_seen"] == 4 * 2 * 2  # steps x world x batch


def test_two_identical_runs_through_their_own_proxy_give_identical_weights(tmp_path, monkeypatch, capsys):
    """Issue 20 #3: the automatic proxy of one byte-identical source came out as 8 distinct files in 9 calls, so
    two identical runs trained different weights. Each run here transcodes its own proxy (its own cache)."""
    from wtours.video.synth import synthesize

    src = synthesize(out_dir=tmp_path / "src", width=320, height=180, fps=15.0, seconds=4.0, sequences=0,
                     progress=False).video  # short side 180 >= 1.5 x 90: trained from a 160x90 proxy
    sds, proxies = [], []
    for i in (1, 2):
        monkeypatch.setenv("WTOURS_CACHE", str(tmp_path / f"cache{i}"))
        out = tmp_path / f"run{i}"
        assert main(["pretrain", "--config", "video/default", "--video", str(src), "--out", str(out),
                     *sum((["--set", s] for s in MICRO), []), "--set", "data.short_side=90"]) == 0
        proxies += list((tmp_path / f"cache{i}" / "proxy").glob("*.mp4"))
        sds.append(torch.load(out / "stage1" / "backbone.pt", map_location="cpu", weights_only=True)["state_dict"])
    assert sds[0].keys() == sds[1].keys()
    assert [k for k in sds[0] if not torch.equal(sds[0][k], sds[1][k])] == []
    assert len(proxies) == 2 and proxies[0].read_bytes() == proxies[1].read_bytes()
