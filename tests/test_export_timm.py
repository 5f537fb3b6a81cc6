"""``backbone.pt`` is a plain timm backbone: no classifier head, loadable without wtours (issue 19)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from wtours.integrity import seal
from wtours.fsutil import torch_save
from wtours.models.weights import export_backbone, load_backbone
from wtours.models.weights import load_init

ARCHS = ["vit_nano_patch8_64", "vit_tiny_patch16_224"]


def _model(arch: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(3)
    return timm.create_model(arch, num_classes=0).eval()


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (no wtours imported unless the code does) -> its JSON line."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_export_has_no_head_and_loads_in_timm_without_wtours(arch, tmp_path):
    model = _model(arch)
    path = export_backbone(model, arch, tmp_path / "backbone.pt", meta={"steps": 1})
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert not [k for k in ck["state_dict"] if k.startswith("head.")]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        want = model.forward_features(torch.nn.functional.interpolate(x, size=model.patch_embed.img_size))
    torch.save({"x": x, "want": want}, tmp_path / "io.pt")
    out = _run(f"""
        import json, sys, torch, timm
        ck = torch.load({str(path)!r}, map_location="cpu", weights_only=True)
        m = timm.create_model(ck["meta"]["timm_base"], **ck["meta"]["timm_kwargs"], num_classes=0).eval()
        m.load_state_dict(ck["state_dict"])  # strict
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        x = torch.nn.functional.interpolate(io["x"], size=m.patch_embed.img_size)
        with torch.no_grad():
            err = float((m.forward_features(x) - io["want"]).abs().max())
        print(json.dumps({{"err": err, "wtours": [k for k in sys.modules if k.split(".")[0] == "wtours"]}}))
    """)
    assert out["wtours"] == [], "the loading process imported wtours"
    assert out["err"] < 1e-5


def test_import_wtours_registers_the_small_vits_with_timm_lazily(tmp_path):
    model = _model("vit_nano_patch8_64")
    path = export_backbone(model, "vit_nano_patch8_64", tmp_path / "backbone.pt")
    out = _run(f"""
        import json, sys
        import wtours
        lazy = "timm" not in sys.modules and "torch" not in sys.modules   # import wtours stays light
        import torch, timm
        ck = torch.load({str(path)!r}, map_location="cpu", weights_only=True)
        m = timm.create_model(ck["arch"], num_classes=0)
        m.load_state_dict(ck["state_dict"])  # strict
        print(json.dumps({{"lazy": lazy, "arch": ck["arch"], "dim": m.embed_dim}}))
    """)
    assert out == {"lazy": True, "arch": "vit_nano_patch8_64", "dim": 128}


def test_old_exports_with_a_zero_head_still_load(tmp_path):
    """wtours < 0.2 wrote a zeroed 1000-class head; every loader drops it."""
    import timm

    arch = "vit_nano_patch8_64"
    torch.manual_seed(0)
    old_model = timm.create_model(arch)  # with its 1000-class head
    sd = {k: (torch.zeros_like(v) if k.startswith("head.") else v) for k, v in old_model.state_dict().items()}
    assert "head.weight" in sd
    torch_save(seal({"arch": arch, "state_dict": sd, "meta": {}}, in_meta=True), tmp_path / "old.pt")
    model, info = load_backbone(str(tmp_path / "old.pt"))
    assert info["verified"] is True and model.num_classes == 0
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    init = load_init(str(tmp_path / "old.pt"))
    assert init.arch == arch and not [k for k in init.state_dict if k.startswith("head.")]
