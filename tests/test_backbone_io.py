"""backbone.pt export / loading: timm-loadable, foreign state dicts, clear errors."""

import timm
import torch

import pytest

from wtours.errors import UserError
from wtours.models.backbone_io import export_backbone, infer_arch, load_backbone

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
    fresh = timm.create_model(ckpt["arch"])
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
