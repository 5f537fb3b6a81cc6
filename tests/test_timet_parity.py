"""Issue 18 (TimeT): crop geometry on 16:9 frames, the reference's one-op colour jitter, and the
timet_vits16 / proof_timet presets' reference-parity defaults."""

from __future__ import annotations

import pytest
import torch

from wtours.stages.video.augment import (ClipAugment, crop_fit_problem, max_fitting_scale, one_jitter_op, sample_photometric,
                            sample_resized_crop_boxes)
from wtours.config import load_config
from wtours.errors import ConfigError
from wtours.stages.video.config import CropsConfig, VideoPretrainConfig

H, W = 256, 456  # a 16:9 frame, as the issue measured


def timet_crops(**over) -> CropsConfig:
    cfg = load_config(VideoPretrainConfig, "video/timet_vits16", [])
    c = cfg.crops
    for k, v in over.items():
        setattr(c, k, v)
    return c


def test_timet_views_cover_the_whole_16_9_frame_at_the_references_aspect_and_area():
    """The issue's measurement: x range 57-399 only, source aspect 1.00-1.77 (one squashed centre box).
    Now: RandomResizedCrops of the whole frame, aspect 3/4-4/3 in source pixels, area .40-.75."""
    c = timet_crops(global_size=32, jitter_p=0.0, grayscale_p=0.0, blur_global_p=0.0)
    aug = ClipAugment(c, seed=0)
    boxes = []
    for i in range(8):
        clips = torch.zeros(64, 2, 3, H, W, dtype=torch.uint8)
        boxes.append(aug(clips).global_boxes)
    b = torch.cat(boxes).double()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert b[:, 0].min() < 5 and b[:, 2].max() > W - 5, "the crops must reach both sides of the frame"
    assert b[:, 1].min() < 5 and b[:, 3].max() > H - 5
    aspect = w / h
    assert aspect.min() >= 0.75 - 1e-4 and aspect.max() <= 4 / 3 + 1e-4
    assert aspect.max() - aspect.min() > 0.4, "the aspect must vary (not one centre box)"
    area = w * h / (H * W)
    assert area.min() >= 0.4 - 1e-4 and area.max() <= 0.75 + 1e-4
    assert len({tuple(x) for x in b.round().tolist()}) > 0.9 * len(b)  # boxes differ, no fixed fallback
    # the centre of the boxes spreads over the frame's width (the old fallback: always x = 228)
    cx = (b[:, 0] + b[:, 2]) / 2
    assert cx.min() < 0.3 * W and cx.max() > 0.7 * W


def test_a_precrop_that_cannot_fit_the_frame_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        load_config(VideoPretrainConfig, "video/timet_vits16",
                    ["crops.views_from=precrop", "crops.precrop_scale=[1.0,1.0]", "crops.precrop_size=256"])
    msg = str(e.value)
    assert msg.startswith("crops.precrop_scale: ") and "never fit" in msg and "0.75" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="^crops.global_scale: "):  # frame mode: the views themselves
        load_config(VideoPretrainConfig, "video/timet_vits16", ["crops.global_scale=[0.8,1.0]"])
    # a square frame fits the same boxes
    load_config(VideoPretrainConfig, "video/timet_vits16", ["crops.views_from=precrop", "crops.precrop_scale=[1.0,1.0]",
                                                            "crops.precrop_size=256", "data.aspect=1.0"])


def test_the_sampler_refuses_boxes_that_never_fit_instead_of_falling_back():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="never fit"):
        sample_resized_crop_boxes(g, 4, H, W, (1.0, 1.0), (3 / 4, 4 / 3))
    assert max_fitting_scale(W / H, (3 / 4, 4 / 3)) == pytest.approx((4 / 3) / (W / H))
    assert max_fitting_scale(1.0, (3 / 4, 4 / 3)) == 1.0
    assert max_fitting_scale(0.5, (3 / 4, 4 / 3)) == pytest.approx(0.5 / 0.75)
    assert crop_fit_problem("x", (0.4, 1.0), (3 / 4, 4 / 3), H, W) is None
    # where boxes fit, every drawn box is one of them (area and aspect in range)
    b = sample_resized_crop_boxes(g, 4000, H, W, (0.4, 1.0), (3 / 4, 4 / 3)).double()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert ((w / h) <= 4 / 3 + 1e-4).all() and (w <= W + 1e-3).all() and (h <= H + 1e-3).all()


def test_one_jitter_op_keeps_exactly_the_last_op_of_each_images_order():
    g = torch.Generator().manual_seed(0)
    p = sample_photometric(g, 2000, 1.0, 0.8, 0.8, 0.8, 0.2, 0.0, 0.0, (0.1, 2.0))
    q = one_jitter_op(p)
    changed = torch.stack([q.brightness != 1, q.contrast != 1, q.saturation != 1, q.hue != 0], dim=1)
    assert (changed.sum(1) <= 1).all()
    last = p.order[:, 3]
    for k, (a, b) in enumerate(((p.brightness, q.brightness), (p.contrast, q.contrast),
                                (p.saturation, q.saturation), (p.hue, q.hue))):
        assert torch.equal(b[last == k], a[last == k])
    # every op is the surviving one about a quarter of the time
    counts = torch.bincount(last, minlength=4).float() / len(last)
    assert ((counts - 0.25).abs() < 0.04).all()


def test_jitter_ops_one_changes_the_views_less_than_all():
    """Values, not parsing: with only one op the jittered views stay closer to the unjittered ones."""
    x = torch.randint(0, 256, (16, 2, 3, 72, 128), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    base = dict(views_from="frame", global_size=32, local_number=0, jitter_p=1.0, brightness=0.8, contrast=0.8,
                saturation=0.8, hue=0.2, grayscale_p=0.0, blur_global_p=0.0, photometric="clip")
    plain = ClipAugment(CropsConfig(**{**base, "jitter_p": 0.0}), seed=0)(x).global_views
    one = ClipAugment(CropsConfig(**base, jitter_ops="one"), seed=0)(x).global_views
    every = ClipAugment(CropsConfig(**base, jitter_ops="all"), seed=0)(x).global_views
    d_one, d_all = (one - plain).abs().mean(), (every - plain).abs().mean()
    assert 0 < d_one < d_all


def test_timet_presets_default_to_the_reference():
    for name in ("timet_vits16", "proof_timet"):
        cfg = load_config(VideoPretrainConfig, f"video/{name}", [])
        assert cfg.timet.compat_reference is True, name
        assert cfg.timet.loss_frames == "last", name
        assert cfg.optim.clip_grad == 0.0, name
        assert cfg.crops.views_from == "frame" and cfg.crops.jitter_ops == "one", name
        assert (cfg.crops.brightness, cfg.crops.contrast, cfg.crops.saturation, cfg.crops.hue) == (0.8, 0.8, 0.8, 0.2)
    cfg = load_config(VideoPretrainConfig, "video/timet_vits16", [])
    assert tuple(cfg.crops.blur_sigma) == (0.03, 0.62)


def test_new_keys_at_their_defaults_leave_the_training_hash_of_older_runs_alone():
    from wtours.config import to_dict
    from wtours.stages.neco.run import load_neco_config
    from wtours.stages.neco.config import neco_training_view
    from wtours.stages.video.config import training_view

    view = training_view(to_dict(load_config(VideoPretrainConfig, "video/proof", [])))
    assert "views_from" not in view["crops"] and "jitter_ops" not in view["crops"]
    view = training_view(to_dict(load_config(VideoPretrainConfig, "video/proof_timet", [])))
    assert view["crops"]["views_from"] == "frame" and view["crops"]["jitter_ops"] == "one"
    view = neco_training_view(to_dict(load_neco_config("neco/tiny", [])))
    assert "teacher_head" not in view["model"] and "pos_interp" not in view["model"]
    view = neco_training_view(to_dict(load_neco_config("neco/neco_dino_vits16", [])))
    assert view["model"]["teacher_head"] == "independent" and view["model"]["pos_interp"] == "dino"


def test_pretrain_with_a_crop_that_never_fits_exits_2_with_one_line(tmp_path, capsys):
    from wtours.cli import main

    out = tmp_path / "run"
    rc = main(["pretrain", "--config", "video/timet_vits16", "--set", "crops.views_from=precrop",
               "--set", "crops.precrop_scale=[1,1]", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "crops.precrop_scale" in err and "never fit" in err
    assert not out.exists()
