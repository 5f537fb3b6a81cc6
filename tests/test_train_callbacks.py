"""Stage-1 callbacks: mask pictures, CSV metrics that survive a resume, atomic checkpoint IO."""

from __future__ import annotations

import csv
import io

import numpy as np
import torch
from PIL import Image

from wtours.train.callbacks import PALETTE, ResumableCSVLogger, render_masks_png
from wtours.train.checkpointing import AtomicCheckpointIO


def test_mask_picture_layout_and_colours():
    t, k, g = 3, 2, 32
    frames = torch.zeros(t, 3, g, g)  # black frames
    masks = torch.zeros(t, k, 4, dtype=torch.bool)  # 2x2 patch grid
    masks[:, 0, 0] = True  # object 0: top-left patch
    masks[:, 1, 3] = True  # object 1: bottom-right patch
    masks[:, 0, 3] = True  # ... also claimed by object 0, but weaker there
    maps = torch.zeros(t, k, 4)
    maps[:, 0, 0], maps[:, 0, 3], maps[:, 1, 3] = 0.9, 0.1, 0.8
    png = render_masks_png(frames, masks, (2, 2), maps, min_size=64, alpha=1.0)
    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    tile = 64
    assert im.shape == (2 * tile + 2, t * (tile + 2) - 2, 3)
    over = im[tile + 2:]  # second row
    for i in range(t):
        x = i * (tile + 2)
        assert tuple(over[5, x + 5]) == tuple(PALETTE[0].astype(np.uint8))  # top-left: object 0
        assert tuple(over[tile - 5, x + tile - 5]) == tuple(PALETTE[1].astype(np.uint8))  # strongest wins
        assert tuple(over[5, x + tile - 5]) == (0, 0, 0)  # no object
        assert tuple(im[5, x + 5]) == (0, 0, 0)  # first row: plain frames


def test_csv_metrics_keep_rows_before_the_resumed_step(tmp_path):
    log = ResumableCSVLogger(tmp_path, "stage1")
    for s in range(6):
        log.log_metrics({"train/loss": 1.0 / (s + 1)}, step=s)
    log.save()
    path = tmp_path / "stage1" / "metrics.csv"
    assert len(path.read_text().strip().splitlines()) == 7
    resumed = ResumableCSVLogger(tmp_path, "stage1", keep_until_step=3)
    resumed.log_metrics({"train/loss": 0.5}, step=3)
    resumed.save()
    rows = list(csv.DictReader(open(path)))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["train/loss"]) == 0.5
    fresh = ResumableCSVLogger(tmp_path, "stage1")  # a new run in the same folder starts over
    fresh.log_metrics({"train/loss": 2.0}, step=0)
    fresh.save()
    assert len(path.read_text().strip().splitlines()) == 2


def test_atomic_checkpoint_io_replaces_the_file_and_leaves_no_temp(tmp_path):
    io_ = AtomicCheckpointIO()
    p = tmp_path / "stage1" / "last.ckpt"
    io_.save_checkpoint({"a": torch.ones(2)}, p)
    io_.save_checkpoint({"a": torch.zeros(2)}, p)
    assert torch.equal(torch.load(p)["a"], torch.zeros(2))
    assert sorted(x.name for x in p.parent.iterdir()) == ["last.ckpt"]
