"""TimeT in stage 1: DoRA+TimeT end to end, TimeT fine-tuning from a stage-1 backbone on frame folders,
objective config errors, partial training, the backbone lr scale and the reference's swapped EMA."""

from __future__ import annotations

import csv

import pytest
import torch

from wtours.cli import main
from wtours.stages.video.run import load_pretrain_config

pytestmark = pytest.mark.slow

MICRO = [
    "data.frames_per_clip=3", "data.stride=3", "data.short_side=64", "data.clips_per_epoch=12",
    "data.batch_size=2", "data.num_workers=0",
    "crops.precrop_size=48", "crops.global_size=32", "crops.local_size=16", "crops.local_number=2",
    "model.arch=vit_nano_patch8_64", "model.out_dim=64", "model.hidden_dim=64", "model.bottleneck_dim=32",
    "tracking.objects=2", "tracking.sinkhorn_iters=5",
    "timet.head_hidden=[32]", "timet.head_out=16", "timet.prototypes=12",
    "optim.lr=0.002", "optim.lr_batch_reference=2", "optim.warmup_epochs=0.5", "optim.freeze_last_layer_epochs=0.25",
    "trainer.max_steps=3", "trainer.checkpoint_every=3", "trainer.log_every=1",
    "log.picture_every=3", "log.progress=false", "log.tensorboard=false",
]


def _sets(items):
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from wtours.video.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    res = synthesize(out_dir=out, width=160, height=90, fps=10.0, seconds=3.0, sequences=3, seq_frames=6,
                     progress=False)
    return res


@pytest.fixture(scope="module")
def dora_timet_run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("dt") / "run"
    rc = main(["pretrain", "--config", "video/default", "--video", str(synth.video), "--out", str(out),
               *_sets(MICRO + ["objective.dora=1", "objective.timet=1"])])
    assert rc == 0
    return out


def _bb(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_dora_and_timet_train_together_end_to_end(dora_timet_run):
    rows = list(csv.DictReader(open(dora_timet_run / "stage1" / "metrics.csv")))
    logged = [r for r in rows if r.get("train/timet_loss")]
    assert logged and all(r.get("train/dora_loss") for r in logged)
    for r in logged:  # the total is the weighted sum (weights 1, 1)
        assert abs(float(r["train/loss"]) - float(r["train/dora_loss"]) - float(r["train/timet_loss"])) < 1e-4
    sd = torch.load(dora_timet_run / "stage1" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert "objective.dora.dino.center" in sd and "objective.timet.student_head.prototypes" in sd
    protos = sd["objective.timet.student_head.prototypes"]
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(protos.shape[0]))  # renormalised after steps
    meta = _bb(dora_timet_run / "stage1" / "backbone.pt")["meta"]
    assert meta["objectives"] == {"dora": 1.0, "timet": 1.0} and meta["stage"] == "dora+timet"
    assert (dora_timet_run / "stage1" / "pictures" / "masks_step000003.png").is_file()


def test_timet_finetune_from_a_stage1_backbone_on_ytvos_frames(dora_timet_run, synth, tmp_path):
    init = dora_timet_run / "stage1" / "backbone.pt"
    out = tmp_path / "ft"
    sets = MICRO + ["objective.dora=0", "objective.timet=1", "model.train_blocks=2", "crops.local_number=0",
                    "data.sampling=uniform", "optim.backbone_lr_scale=0.1", "optim.lr=0.01"]
    rc = main(["pretrain", "--config", "video/tiny", "--init", str(init), "--frames", str(synth.ytvos_root),
               "--out", str(out), *_sets(sets)])
    assert rc == 0
    a, b = _bb(init)["state_dict"], _bb(out / "stage1" / "backbone.pt")["state_dict"]
    frozen = [k for k in a if not k.startswith(("blocks.4.", "blocks.5.", "head."))]
    assert all(torch.equal(a[k], b[k]) for k in frozen)  # only the last two of 6 blocks train
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("blocks.5."))
    meta = _bb(out / "stage1" / "backbone.pt")["meta"]
    assert meta["init"] == str(init) and meta["frames"] == str(synth.ytvos_root) and meta["stage"] == "timet"
    assert (out / "stage1" / "pictures" / "labels_step000003.png").is_file()
    sd = torch.load(out / "stage1" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("objective.dora.") for k in sd)


@pytest.mark.parametrize("sets, needle", [
    (["objective.foo=1"], "unknown config key 'objective.foo'"),
    (["objective.dora=0", "objective.timet=0"], "every objective weight is 0"),
    (["objective.timet=-1"], "timet: a weight must be >= 0"),
    (["objective.timet=1", "data.frames_per_clip=1"], "data.frames_per_clip: TimeT"),
])
def test_bad_objective_settings_are_one_line(sets, needle, capsys, tmp_path):
    rc = main(["pretrain", "--config", "video/tiny", "--out", str(tmp_path / "x"), *_sets(sets)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_frame_folder_without_jpegs_is_one_line(tmp_path, capsys):
    (tmp_path / "frames" / "JPEGImages" / "v1").mkdir(parents=True)
    (tmp_path / "frames" / "JPEGImages" / "v1" / "notes.txt").write_text("x")
    rc = main(["pretrain", "--config", "video/timet_tiny", "--frames", str(tmp_path / "frames"),
               "--out", str(tmp_path / "x"), "--set", "log.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(tmp_path / "frames") in err[0] and "no" in err[0], err


def test_init_of_another_patch_size_is_one_line(dora_timet_run, tmp_path, capsys):
    # a vit_nano_patch8_64 backbone into a vit_tiny_patch16_224 config
    rc = main(["pretrain", "--config", "video/timet_tiny", "--init", str(dora_timet_run / "stage1" / "backbone.pt"),
               "--out", str(tmp_path / "x"), "--set", "log.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "backbone.pt" in err[0] and "vit_tiny_patch16_224" in err[0], err


def test_backbone_lr_scale_and_frozen_blocks_in_the_optimizer():
    from wtours.stages.video.module import VideoModule, apply_schedules_

    cfg = load_pretrain_config("video/timet_tiny", [])
    m = VideoModule(cfg)
    opt = m.configure_optimizers()
    apply_schedules_(opt, m.ensure_schedules(1).at(0))
    ids = {id(p): n for n, p in m.named_parameters()}
    trained = {ids[id(p)] for g in opt.param_groups for p in g["params"]}
    assert trained and all(n.startswith(("student.vit.blocks.10.", "student.vit.blocks.11.", "objective.timet.student_head."))
                           for n in trained)
    for g in opt.param_groups:
        backbone = ids[id(g["params"][0])].startswith("student.")
        assert g["lr"] == pytest.approx(m.ensure_schedules(1).at(0).lr * (0.1 if backbone else 1.0))


def test_timet_alone_in_compat_mode_swaps_the_backbone_ema():
    from wtours.stages.video.module import VideoModule

    for compat in (False, True):
        cfg = load_pretrain_config("video/timet_tiny", [f"timet.compat_reference={str(compat).lower()}"])
        m = VideoModule(cfg)
        with torch.no_grad():
            for p in m.student.parameters():
                p.add_(1.0)
        t0 = m.teacher.vit.blocks[-1].mlp.fc1.weight.clone()
        s = m.student.vit.blocks[-1].mlp.fc1.weight.clone()
        v = m.ensure_schedules(1).at(0)
        m.after_optimizer_step(v)
        mom = v.momentum
        want = (1 - mom) * t0 + mom * s if compat else mom * t0 + (1 - mom) * s
        torch.testing.assert_close(m.teacher.vit.blocks[-1].mlp.fc1.weight, want)
