"""GT-supervised baseline (wtours/bench/supervised.py): crops stay inside the frame, training lowers the loss on
labelled synthetic frames, exports load as encoders and differ from the random start, re-runs are reused."""

from __future__ import annotations

import math

import pytest
import torch

from wtours.bench.supervised import crop_grids, load_frames, supervised_set, train_supervised
from wtours.errors import UserError
from wtours.models.weights import load_backbone


def test_crop_grids_stay_inside_the_frame_with_the_asked_area_and_flips():
    gen = torch.Generator().manual_seed(0)
    aspect = 16 / 9
    th = crop_grids(4000, aspect, gen)
    hw, hh = th[:, 0, 0].abs(), th[:, 1, 1]
    assert (th[:, 0, 1] == 0).all() and (th[:, 1, 0] == 0).all()
    # inside [-1, 1]: centre +- half-extent
    assert ((th[:, 0, 2].abs() + hw) <= 1 + 1e-6).all() and ((th[:, 1, 2].abs() + hh) <= 1 + 1e-6).all()
    area = hw * hh
    assert area.min() >= 0.3 * 0.7 and area.max() <= 1.0 + 1e-6  # clamping can only shrink a too-wide crop
    ratio = hw * aspect / hh  # width / height in pixels
    unclamped = (hw < 1) & (hh < 1)
    assert ratio[unclamped].min() >= 0.75 - 1e-4 and ratio[unclamped].max() <= 4 / 3 + 1e-4
    flips = (th[:, 0, 0] < 0).float().mean()
    assert 0.45 < flips < 0.55


@pytest.mark.slow
def test_supervised_training_learns_and_exports(tmp_path):
    root = supervised_set(tmp_path / "data", sequences=2, seq_frames=4, height=90, width=160, seed=0)
    x, y, n_cat = load_frames(root, 48)
    assert x.dtype == torch.uint8 and x.shape[:2] == (8, 3) and min(x.shape[-2:]) == 48
    assert y.shape == (8, *x.shape[-2:]) and n_cat >= 1 and int(y.max()) <= n_cat
    paths = train_supervised("vit_nano_patch8_64", root, tmp_path / "run", steps=40, batch=8, seed=3,
                             short_side=48, crop_size=32, snapshots=[20])
    assert sorted(paths) == [20, 40] and all(p.is_file() for p in paths.values())
    model, info = load_backbone(str(paths[40]))
    sup = info["meta"]["supervised"]
    assert sup["step"] == 40 and sup["categories"] == n_cat
    losses = [v for _, v in sup["losses"]]
    assert all(math.isfinite(v) for v in losses)
    rand, _ = load_backbone("random:vit_nano_patch8_64@3")
    diff = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(), rand.state_dict().values()))
    assert diff > 1e-3  # trained away from its start ...
    mid, _ = load_backbone(str(paths[20]))
    assert any(not torch.equal(a, b) for a, b in zip(mid.state_dict().values(), model.state_dict().values()))
    # ... and a second call with the same settings reuses the files
    stamp = {p: p.stat().st_mtime_ns for p in paths.values()}
    again = train_supervised("vit_nano_patch8_64", root, tmp_path / "run", steps=40, batch=8, seed=3,
                             short_side=48, crop_size=32, snapshots=[20])
    assert {p: p.stat().st_mtime_ns for p in again.values()} == stamp


def test_supervised_training_refuses_an_empty_budget(tmp_path):
    with pytest.raises(UserError, match="steps >= 1"):
        train_supervised("vit_nano_patch8_64", tmp_path, tmp_path / "run", steps=0, batch=8, seed=0)
