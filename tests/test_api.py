"""The Python API of ``import wtours`` (issue 19): load_backbone, extract_features, evaluate."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import wtours
from wtours.errors import UserError


def test_import_wtours_is_light_and_the_api_loads_on_first_use():
    code = ("import sys, json, wtours; light = 'torch' not in sys.modules; f = wtours.load_backbone; "
            "print(json.dumps({'light': light, 'api': callable(f), 'all': sorted(wtours.__all__)}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["light"] and out["api"]
    assert {"load_backbone", "extract_features", "evaluate", "evaluate_clustering"} <= set(out["all"])
    with pytest.raises(AttributeError):
        wtours.no_such_thing  # noqa: B018


def test_extract_features_shapes_and_the_same_tokens_as_the_model():
    model = wtours.load_backbone("random:vit_nano_patch8_64@0")
    assert not model.training and model.num_classes == 0
    imgs = torch.rand(3, 3, 64, 72)
    f = wtours.extract_features(model, imgs)
    assert f.shape == (3, 128, 8, 9) and f.dtype == torch.float32
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tok = model.forward_features((imgs - mean) / std)[:, 1:]
    assert torch.allclose(f, tok.transpose(1, 2).reshape(3, 128, 8, 9), atol=1e-5)
    # uint8 HWC arrays, lists, floors to the patch grid, resizes
    arr = (imgs[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    assert wtours.extract_features(model, [arr, arr]).shape == (2, 128, 8, 9)
    assert wtours.extract_features(model, imgs[:, :, :61, :70]).shape == (3, 128, 7, 8)
    assert wtours.extract_features(model, imgs, size=(32, 32)).shape == (3, 128, 4, 4)
    with pytest.raises(UserError, match="RGB images"):
        wtours.extract_features(model, torch.rand(2, 1, 64, 64))


def test_evaluate_runs_an_instrument_with_keyword_arguments(tmp_path):
    from wtours.video.synth import write_davis_like

    write_davis_like(tmp_path / "d", sequences=2, seq_frames=3, height=64)
    m = wtours.evaluate("clustering", dataset="davis", root=tmp_path / "d", checkpoint="random:vit_nano_patch8_64",
                        config="eval/tiny", overrides={"overlays": 0, "gif": False, "progress": False,
                                                        "restarts": 1, "repeats": 1}, device="cpu")
    assert {"F", "C", "D"} <= set(m) and all(0 <= m[k] <= 100 for k in "FCD")
    with pytest.raises(UserError, match="unknown instrument"):
        wtours.evaluate("knn", dataset="davis", root=tmp_path / "d", checkpoint="random:vit_nano_patch8_64")
