"""Stage-1 callbacks: mask pictures, CSV metrics that survive a resume, atomic checkpoint IO."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

from wtours.stages.video.callbacks import PALETTE, mask_overlays, render_masks_png
from wtours.train.csv_logger import ResumableCSVLogger
from wtours.train.checkpointing import AtomicCheckpointIO


def test_mask_overlay_colours_and_the_picture():
    t, k, g = 3, 2, 32
    frames = torch.zeros(t, 3, g, g)  # black frames
    masks = torch.zeros(t, k, 4, dtype=torch.bool)  # 2x2 patch grid
    masks[:, 0, 0] = True  # object 0: top-left patch
    masks[:, 1, 3] = True  # object 1: bottom-right patch
    masks[:, 0, 3] = True  # ... also claimed by object 0, but weaker there
    maps = torch.zeros(t, k, 4)
    maps[:, 0, 0], maps[:, 0, 3], maps[:, 1, 3] = 0.9, 0.1, 0.8
    img, over = mask_overlays(frames, masks, (2, 2), maps, alpha=1.0)
    assert img.shape == over.shape == (t, g, g, 3) and img.dtype == over.dtype == np.uint8
    for i in range(t):
        assert tuple(over[i, 5, 5]) == tuple(PALETTE[0].astype(np.uint8))  # top-left: object 0
        assert tuple(over[i, g - 5, g - 5]) == tuple(PALETTE[1].astype(np.uint8))  # strongest wins
        assert tuple(over[i, 5, g - 5]) == (0, 0, 0)  # no object
        assert tuple(img[i, 5, 5]) == (0, 0, 0)  # the plain frames
    png = render_masks_png(frames, masks, (2, 2), maps, min_size=64, alpha=1.0)
    im = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert im.shape[0] > 2 * 64 and im.shape[1] > t * 64  # two rows of frames plus headers and legend
    colours = {tuple(c) for c in im.reshape(-1, 3)}
    assert tuple(PALETTE[0].astype(np.uint8)) in colours and tuple(PALETTE[1].astype(np.uint8)) in colours


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


def test_csv_metrics_new_columns_widen_the_header_and_cut_rows_are_dropped_on_resume(tmp_path):
    log = ResumableCSVLogger(tmp_path, "stage1")
    log.log_metrics({"train/loss": 1.0, "epoch": 0}, step=0)
    log.save()
    log.log_metrics({"train/loss": 0.9, "perf/clips_per_s": 3.0, "epoch": 0}, step=1)  # a new column
    log.save()
    log.log_metrics({"train/loss": 0.8, "epoch": 0}, step=2)
    log.finalize("success")
    path = tmp_path / "stage1" / "metrics.csv"
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["epoch", "perf/clips_per_s", "step", "train/loss"]  # Lightning's format: sorted
    assert [(r["step"], r["perf/clips_per_s"]) for r in rows] == [("0", ""), ("1", "3.0"), ("2", "")]
    with open(path, "a") as f:
        f.write("0,")  # a row cut short by a kill
    resumed = ResumableCSVLogger(tmp_path, "stage1", keep_until_step=5)
    resumed.log_metrics({"train/loss": 0.7, "epoch": 1}, step=5)
    resumed.save()
    assert [r["step"] for r in csv.DictReader(open(path))] == ["0", "1", "2", "5"]
    assert not list(path.parent.glob(".*.tmp"))


def test_atomic_checkpoint_io_replaces_the_file_and_leaves_no_temp(tmp_path):
    io_ = AtomicCheckpointIO()
    p = tmp_path / "stage1" / "last.ckpt"
    io_.save_checkpoint({"a": torch.ones(2)}, p)
    io_.save_checkpoint({"a": torch.zeros(2)}, p)
    assert torch.equal(torch.load(p)["a"], torch.zeros(2))
    assert sorted(x.name for x in p.parent.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------- collapse signals a user sees


def _drive_collapse_warning(seq: list[dict], log_every: int = 2, out_dim: int = 256, rank0: bool = True,
                            repeat: int = 1):
    """Feed ``seq[i]`` as the metrics logged at optimizer step ``i + 1`` (each ``repeat`` micro-batches)."""
    from types import SimpleNamespace

    from wtours.train.callbacks import CollapseWarning

    cb = CollapseWarning(out_dim, log_every, "runs/x/report.md")
    trainer = SimpleNamespace(global_step=0, is_global_zero=rank0, callback_metrics={})
    for step, m in enumerate(seq, start=1):
        trainer.global_step = step
        trainer.callback_metrics = {f"train/{k}": torch.tensor(float(v)) for k, v in m.items()}
        for _ in range(repeat):  # gradient accumulation: several batch ends per optimizer step
            cb.on_train_batch_end(trainer, None, None, None, 0)
    return cb


HEALTHY = {"teacher_entropy": 2.0, "teacher_batch_entropy": 5.0, "feature_std": 0.8, "prototypes_used": 40}
UNIFORM = {**HEALTHY, "teacher_entropy": 0.95 * np.log(256)}


def test_collapse_warning_one_line_for_a_collapsing_run_none_for_a_healthy_one(capsys):
    cb = _drive_collapse_warning([HEALTHY] * 60)
    assert cb.warnings == [] and capsys.readouterr().err == ""
    # collapses at step 11; logged (every 2 steps) from step 12 to 30: 10 logging intervals -> one warning,
    # at the second collapsed logging step (patience 2)
    cb = _drive_collapse_warning([HEALTHY] * 10 + [UNIFORM] * 20, repeat=2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(cb.warnings) == 1, err
    line = err.strip()
    assert line.startswith("warning: step 14:") and "train/teacher_entropy 5.268" in line
    assert "0.9*log C = 4.991" in line and "runs/x/report.md" in line
    # and not more often than once per 10 logging intervals
    cb = _drive_collapse_warning([HEALTHY] * 10 + [UNIFORM] * 50)
    assert [w.split(":")[0] + ":" + w.split(":")[1] for w in cb.warnings] == \
        ["warning: step 14", "warning: step 34", "warning: step 54"]
    capsys.readouterr()
    assert _drive_collapse_warning([UNIFORM] * 10, rank0=False).warnings == []  # rank 0 only


@pytest.mark.parametrize("signal, value, needle", [
    ("feature_std", 0.01, "train/feature_std 0.0100 < 0.05"),
    ("prototypes_used", 1, "train/prototypes_used 1 <= 1"),
])
def test_collapse_warning_other_signals(capsys, signal, value, needle):
    cb = _drive_collapse_warning([{**HEALTHY, signal: value}] * 4)
    assert len(cb.warnings) == 1 and needle in cb.warnings[0]
    assert capsys.readouterr().err.strip() == cb.warnings[0]


def test_report_has_a_collapse_section_and_picture(tmp_path):
    from wtours.report import write_report

    run = tmp_path / "run"
    (run / "stage1").mkdir(parents=True)
    (run / "config.yaml").write_text("name: t\nmodel:\n  arch: vit_tiny_patch16_224\n  out_dim: 64\n")
    keys = ["teacher_entropy", "teacher_batch_entropy", "kl", "prototypes_used", "center_norm", "feature_std",
            "mask_coverage"]
    with open(run / "stage1" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "train/loss", *(f"train/{k}" for k in keys)])
        for s in range(10):
            w.writerow([s, 4.0 - 0.1 * s, 1.0 + 0.3 * s, 3.0, 1.0 / (s + 1), 10 - s, 0.1 * s, 0.9 - 0.08 * s, 0.5])
    text = write_report(run).read_text()
    assert "### Collapse signals" in text and "log C = 4.159 nats (C = model.out_dim = 64)" in text
    assert "| `train/teacher_entropy` | 1 | 3.7 | 1 | 3.7 |" in text
    assert "| `train/feature_std` | 0.9 | 0.18 | 0.18 | 0.9 |" in text
    assert "![collapse signals](stage1/collapse.png)" in text
    im = np.asarray(Image.open(run / "stage1" / "collapse.png").convert("RGB"))
    h, w = im.shape[:2]
    assert w > 1.5 * 400 and h > 3.5 * 200 and h > w  # 7 panels, 2 a row: 4 rows
    red = np.array([214, 39, 40])  # matplotlib's tab:red, the dashed log C line
    is_red = (np.abs(im.astype(int) - red).sum(axis=2) < 10)
    assert is_red[: h // 4, : w // 2].sum() > 20  # on the teacher-entropy panel (first)
    assert is_red[: h // 4, w // 2:].sum() == 0  # not on the second one


def test_collapse_warning_stays_quiet_when_the_run_diverged(capsys):
    # a nan loss makes every target argmax prototype 0: that is divergence (FiniteGuard's line), not collapse
    cb = _drive_collapse_warning([{**HEALTHY, "loss": float("nan"), "prototypes_used": 1,
                                   "teacher_entropy": float("nan")}] * 12)
    assert cb.warnings == [] and capsys.readouterr().err == ""


def test_one_collapsed_looking_batch_is_not_a_warning(capsys):
    cb = _drive_collapse_warning([HEALTHY] * 10 + [UNIFORM] * 2 + [HEALTHY] * 10)  # logged once collapsed
    assert cb.warnings == [] and capsys.readouterr().err == ""


def test_a_checkpoint_of_another_layout_is_refused_with_one_line(tmp_path):
    from wtours.errors import UserError
    from wtours.train.checkpointing import CHECKPOINT_LAYOUT, check_config

    path = tmp_path / "last.ckpt"
    check_config({"config_hash": "h", "layout": CHECKPOINT_LAYOUT}, "h", {}, path)  # this layout: fine
    with pytest.raises(UserError) as e:  # no layout: written before the objective owned its heads and centre
        check_config({"config_hash": "h", "config": {}}, "h", {}, path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: checkpoint was written by an older wtours (checkpoint layout 1")
    assert "--fresh" in msg and "\n" not in msg
