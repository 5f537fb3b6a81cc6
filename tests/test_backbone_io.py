"""backbone.pt export / loading: timm-loadable, foreign state dicts, clear errors."""

import timm
import torch

import pytest

from wtours.errors import UserError
from wtours.models.weights import export_backbone, infer_arch, load_backbone

ARCH = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return timm.create_model(ARCH, num_classes=0, dynamic_img_size=True)


def test_export_loads_strictly_into_timm_and_keeps_the_weights(model, tmp_path):
    path = export_backbone(model, ARCH, tmp_path / "backbone.pt", meta={"steps": 3})
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ckpt) == ["arch", "state_dict", "meta"]
    assert ckpt["arch"] == ARCH and ckpt["meta"]["steps"] == 3 and ckpt["meta"]["wtours_checksum"].startswith("sha256:")
    fresh = timm.create_model(ckpt["arch"], num_classes=0)
    fresh.load_state_dict(ckpt["state_dict"])  # strict
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(fresh.forward_features(x), model.eval().forward_features(x), atol=1e-5)
    assert not list(tmp_path.glob(".*tmp")), "no temp file left behind"


def test_load_backbone_round_trip_and_prefixed_foreign_dicts(model, tmp_path):
    export_backbone(model, ARCH, tmp_path / "b.pt")
    loaded, info = load_backbone(str(tmp_path / "b.pt"))
    assert info["arch"] == ARCH and info["verified"] is True
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    loaded2, info2 = load_backbone(str(tmp_path / "ddp.pth"))
    assert info2["arch"] == ARCH  # inferred from shapes
    assert info2["verified"] is False  # a foreign file: no checksum, accepted unverified
    for (k, a), b in zip(loaded.state_dict().items(), loaded2.state_dict().values()):
        assert torch.equal(a, b), k


def test_random_spec_is_seeded():
    a, info = load_backbone("random:" + ARCH)
    b, _ = load_backbone("random:" + ARCH)
    assert info == {"kind": "random", "arch": ARCH, "spec": "random:" + ARCH}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_random_spec_takes_an_init_seed():
    def weights(spec):
        return list(load_backbone(spec)[0].state_dict().values())

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))

    s0, s0_again, s1, plain = (weights(f"random:{ARCH}{suffix}") for suffix in ("@0", "@0", "@1", ""))
    assert same(s0, s0_again) and same(s0, plain)  # no '@': seed 0, as before
    assert not same(s0, s1)
    assert not torch.equal(s0[2], s1[2])  # e.g. the patch embedding differs, not just one tensor somewhere
    with pytest.raises(UserError, match=r"random:vit_tiny_patch16_224@x: the init seed after '@' must be an integer"):
        load_backbone(f"random:{ARCH}@x")


def test_infer_arch_from_shapes(model):
    assert infer_arch(model.state_dict()) == ARCH
    small = timm.create_model("vit_small_patch16_224", num_classes=0)
    assert infer_arch(small.state_dict()) == "vit_small_patch16_224"


def test_errors_name_the_file_and_problem(model, tmp_path):
    with pytest.raises(UserError, match="nope.pt: checkpoint not found"):
        load_backbone(str(tmp_path / "nope.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pt: cannot read checkpoint"):
        load_backbone(str(junk))
    export_backbone(model, ARCH, tmp_path / "tiny.pt")
    with pytest.raises(UserError, match="weights do not match arch 'vit_small_patch16_224'"):
        load_backbone(str(tmp_path / "tiny.pt"), arch="vit_small_patch16_224")
    with pytest.raises(UserError, match="unknown or unsupported timm architecture 'vit_nonsense'"):
        load_backbone("random:vit_nonsense")
    with pytest.raises(UserError, match="'resnet18' is a ResNet, not a ViT"):
        load_backbone("random:resnet18")


def test_non_finite_weights_are_never_exported(tmp_path):
    bad = timm.create_model(ARCH, num_classes=0)
    with torch.no_grad():
        bad.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match=r"backbone.pt: refusing to export non-finite weights \(blocks.1.mlp.fc1.weight"):
        export_backbone(bad, ARCH, tmp_path / "backbone.pt")
    assert not list(tmp_path.iterdir())


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    import stat

    from wtours.fsutil import write_json

    p = write_json(tmp_path / "m.json", {"a": 1})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


# ----------------------------------------------------------------------------- training checkpoints, DINO's file


def _training_checkpoint(tmp_path, rename=None):
    """A ``wtours pretrain`` checkpoint as Lightning writes it (state dict + the module's ``wtours`` block,
    sealed), of the tiny preset, with a teacher that differs from the student."""
    from wtours.config import load_config
    from wtours.fsutil import torch_save
    from wtours.integrity import seal
    from wtours.stages.video.config import VideoPretrainConfig
    from wtours.stages.video.module import VideoModule

    m = VideoModule(load_config(VideoPretrainConfig, "video/tiny"))
    with torch.no_grad():
        for p in m.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = m.state_dict()
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    ckpt = {"epoch": 0, "global_step": 7, "state_dict": sd}
    m.on_save_checkpoint(ckpt)
    if rename:
        ckpt["wtours"].pop("arch")
    return torch_save(seal(ckpt), tmp_path / "last.ckpt"), m


def _same(model, vit):
    want = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    got = model.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_training_checkpoint_loads_its_teacher_unless_the_student_is_asked_for(tmp_path):
    """Issue 12: `wtours eval clustering --checkpoint runs/x/stage1/last.ckpt` evaluates the teacher (the EMA,
    as exported), `last.ckpt:student` the student; the arch is the run's."""
    path, m = _training_checkpoint(tmp_path)
    teacher, info = load_backbone(str(path))
    assert info["arch"] == "vit_tiny_patch16_224" and info["role"] == "teacher" and info["verified"] is True
    assert info["meta"] == {"checkpoint": {"role": "teacher", "global_step": 7, "config_hash": m.config_hash}}
    assert _same(teacher, m.teacher.vit) and not _same(teacher, m.student.vit)
    student, info_s = load_backbone(f"{path}:student")
    assert info_s["role"] == "student" and _same(student, m.student.vit)
    assert _same(load_backbone(f"{path}:teacher")[0], m.teacher.vit)
    with pytest.raises(UserError, match="drop the suffix"):
        load_backbone(str(export_backbone(m.teacher.vit, ARCH, tmp_path / "backbone.pt")) + ":student")
    with pytest.raises(UserError, match="last.ckpt: checkpoint not found"):
        load_backbone(str(tmp_path / "nope" / "last.ckpt") + ":student")


def test_older_checkpoint_layouts_with_backbone_prefixes_load(tmp_path):
    path, m = _training_checkpoint(tmp_path, rename=lambda k: k.replace(".vit.", ".backbone.vit.", 1))
    model, info = load_backbone(str(path))  # arch inferred from the shapes
    assert info["role"] == "teacher" and info["arch"] == ARCH and _same(model, m.teacher.vit)
    assert _same(load_backbone(f"{path}:student")[0], m.student.vit)


def test_dino_official_state_dict_loads_with_weights_only(tmp_path, monkeypatch):
    """`dino_deitsmall16_pretrain.pth` is a plain dict of tensors with timm's key names (no head): it loads with
    weights_only=True, unverified, as vit_small_patch16_224 (in either torch file format)."""
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", num_classes=0)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    assert not any(k.startswith("head") for k in sd) and sd["pos_embed"].shape == (1, 197, 384)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    for zipped in (True, False):
        p = tmp_path / f"dino_deitsmall16_pretrain_{zipped}.pth"
        torch.save(sd, p, _use_new_zipfile_serialization=zipped)
        model, info = load_backbone(str(p))
        assert info["arch"] == "vit_small_patch16_224" and info["verified"] is False and "role" not in info
        assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    assert calls and all(c is True for c in calls)
