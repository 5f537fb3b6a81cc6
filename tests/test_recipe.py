"""The DoRA recipe of configs/video/dora_vits16.yaml against the reference (issue 12 §2): the epoch is every
frame as a clip start, schedule lengths in steps follow from it, and no crop has less source detail than
the reference gives it."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from wtours.config import load_config
from wtours.errors import ConfigError
from wtours.stages.video.run import crop_detail_warning, load_pretrain_config
from wtours.stages.video.schedules import build_schedules, clip_starts, resolve_clips_per_epoch, steps_per_epoch
from wtours.stages.video.config import (
    CropsConfig,
    VideoPretrainConfig,
    detail_problem,
    min_short_side,
    smallest_crops,
)
from wtours.video.decode import clip_size


# ----------------------------------------------------------------------------- the epoch


def test_clips_per_epoch_frames_is_every_valid_clip_start_of_the_videos(test_videos):
    from wtours.video.index import index_video

    a, b = str(test_videos("h264")), str(test_videos("long30"))
    cfg = load_config(VideoPretrainConfig, "video/tiny", ["data.clips_per_epoch=frames", "data.stride=5",
                                                           "data.frames_per_clip=3", "data.batch_size=2"])
    assert cfg.data.clips_per_epoch == "frames"
    with pytest.raises(ConfigError, match="data.clips_per_epoch: 'frames' is resolved when the videos are indexed"):
        steps_per_epoch(cfg, 1)  # never silently a wrong number
    span = (3 - 1) * 5 + 1
    want = sum(index_video(v).num_frames - span + 1 for v in (a, b))
    assert clip_starts(cfg, [a, b]) == want
    assert resolve_clips_per_epoch(cfg, [a, b]) == want and cfg.data.clips_per_epoch == want  # in place
    assert steps_per_epoch(cfg, 1) == want // 2
    assert resolve_clips_per_epoch(cfg, [a]) == want  # a number stays as it is


def test_clips_per_epoch_accepts_a_number_or_frames_only():
    with pytest.raises(ConfigError, match="data.clips_per_epoch"):
        load_config(VideoPretrainConfig, None, ["data.clips_per_epoch=frame"])
    with pytest.raises(ConfigError, match=r"clips_per_epoch \(2\) must be >= batch_size \(16\) or 'frames'"):
        load_config(VideoPretrainConfig, None, ["data.clips_per_epoch=2"])


def test_the_recipe_epoch_gives_the_reference_schedule_lengths_in_steps():
    """dora.md §1.2 / §4: N frames -> N clips per epoch; at 8 GPUs x 16 clips: N/128 steps per epoch, warm-up 10
    epochs, last layer frozen 1 epoch, cosines over 100 epochs."""
    cfg = load_config(VideoPretrainConfig, "video/dora_vits16")
    assert cfg.data.clips_per_epoch == "frames" and cfg.data.batch_size == 16
    cfg.data.clips_per_epoch = 320_000  # what a 320k-frame tour resolves to
    s = build_schedules(cfg, steps_per_epoch(cfg, 8), world_size=8)
    assert s.steps_per_epoch == 2500 and s.total_steps == 250_000
    assert s.freeze_last_layer_steps == 2500
    assert s.peak_lr == pytest.approx(5e-4 * 128 / 256)
    warm = int(torch.argmax(s.lr).item())  # the lr peaks where the warm-up ends
    assert abs(warm - 25_000) <= 1


@pytest.mark.slow
def test_pretrain_resolves_records_and_resumes_with_frames(tmp_path, test_videos, capsys):
    from wtours.cli import main
    from wtours.train.checkpointing import read_checkpoint_meta

    video = str(test_videos("long30"))  # 600 frames of 64x36
    sets = ["data.clips_per_epoch=frames", "data.frames_per_clip=2", "data.stride=100", "data.short_side=32",
            "data.batch_size=2", "data.num_workers=0", "crops.precrop_size=32", "crops.global_size=32",
            "crops.local_size=16", "crops.local_number=2", "model.arch=vit_tiny_patch16_224", "model.out_dim=64",
            "model.hidden_dim=32", "model.bottleneck_dim=16", "tracking.objects=2", "tracking.sinkhorn_iters=3",
            "trainer.max_steps=2", "trainer.checkpoint_every=2", "log.picture_every=0", "log.tensorboard=false"]
    argv = ["pretrain", "--config", "video/default", "--video", video, "--out", str(tmp_path / "run"), *sum((["--set", s] for s in sets), [])]
    assert main(argv) == 0
    err = capsys.readouterr().err
    n = 600 - 100  # frames - span + 1
    assert f"data.clips_per_epoch: frames -> {n}" in err and f"({n // 2}/epoch)" in err
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text.startswith(f"# data.clips_per_epoch: frames -> {n}")
    assert yaml.safe_load(text)["data"]["clips_per_epoch"] == n  # the config of the run is the resolved one
    meta = read_checkpoint_meta(tmp_path / "run" / "stage1" / "last.ckpt")
    assert meta["config"]["data"]["clips_per_epoch"] == n
    # the same command again resumes (the resume check compares the resolved config) and only re-exports
    assert main(argv) == 0
    assert "continuing it" in capsys.readouterr().err


# ----------------------------------------------------------------------------- crop detail


def test_smallest_crops_in_source_pixels_match_the_issue_figures():
    c = CropsConfig()  # the recipe's crops: pre-crop 300 @ .2, global 224 @ .4, local 112 @ .05
    d = {x.name: x for x in smallest_crops(c, 360, 640)}
    assert d["pre-crop"].source_side == pytest.approx(math.sqrt(0.2 * 360 * 640)) == pytest.approx(214.7, abs=0.1)
    assert d["local crop"].source_side == pytest.approx(48.0, abs=0.1)
    assert d["global view"].source_side == pytest.approx(135.8, abs=0.1)
    # what the reference gives them: its views are cut from a 300-px resize of the pre-crop
    assert d["pre-crop"].reference_side == 300
    assert d["global view"].reference_side == pytest.approx(math.sqrt(0.4) * 300)  # 190: itself enlarged to 224
    assert d["local crop"].reference_side == pytest.approx(math.sqrt(0.05) * 300)  # 67: itself enlarged to 112
    assert all(x.below_reference for x in d.values())
    assert d["pre-crop"].upsample == pytest.approx(300 / 214.7, rel=1e-3)


def test_min_short_side_is_where_the_precrop_stops_being_enlarged():
    c = CropsConfig()
    s = min_short_side(c, 16 / 9)
    assert s == 504
    for short, bad in ((s - 2, True), (s, False), (360, True), (540, False)):
        h, w = clip_size(short, 16 / 9)
        assert (detail_problem(c, h, w) is not None) == bad, short
    assert min_short_side(c, 9 / 16) == 504  # portrait frames: the same area


def test_the_recipe_preset_enlarges_no_crop_beyond_the_reference():
    """Fails at short_side 360 (the preset before issue 12): pre-crop 215 -> 300, local crops 48 px."""
    cfg = load_config(VideoPretrainConfig, "video/dora_vits16")
    h, w = clip_size(cfg.data.short_side, cfg.data.aspect)
    crops = {x.name: x for x in smallest_crops(cfg.crops, h, w)}
    assert crops["pre-crop"].source_side >= cfg.crops.precrop_size  # never enlarged
    assert crops["local crop"].source_side >= math.sqrt(0.05) * 300  # >= the reference's 67 px
    assert not any(x.below_reference for x in crops.values())
    assert crop_detail_warning(cfg) is None
    from wtours.cli import build_parser

    prepared = build_parser().parse_args(["prepare", "x.mp4"]).short_side
    assert prepared >= cfg.data.short_side  # wtours prepare's default proxy is not enlarged by the loader


def test_the_warning_names_the_setting_or_the_small_source(test_videos):
    cfg = load_pretrain_config("video/dora_vits16", ["data.short_side=360"])
    msg = crop_detail_warning(cfg)
    assert msg is not None and len(msg.splitlines()) == 1
    assert "data.short_side 360" in msg and "pre-crop 215 px -> 300" in msg and "local crop 48 px -> 112" in msg
    assert "data.short_side >= 504" in msg
    # a 64x36 video decoded at short side 540 is enlarged 15x: its own pixels are what the crops get
    cfg = load_pretrain_config("video/dora_vits16", [])
    video = str(test_videos("long30"))
    msg = crop_detail_warning(cfg, [video])
    assert msg is not None and f"{video} (64x36, enlarged to data.short_side 540)" in msg
