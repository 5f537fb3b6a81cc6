"""wtours.video.loader.ClipLoader: batch diversity at a low decode ratio, exact resume with any number of
workers, the pool's memory bound, I420 transport turned into the right RGB, the photometric hue once."""

import numpy as np
import pytest
import torch

from conftest import read_barcode
from wtours.stages.video.augment import adjust_hue, apply_photometric, sample_photometric
from wtours.video.clips import ClipDataset, worker_context
from wtours.video.loader import ClipLoader, distinct_windows, held_clips, lane_order, to_clip_chw

T, STRIDE, B = 4, 2, 16


def _dataset(v, clips=480, **kw):
    return ClipDataset([v], frames_per_clip=T, stride=STRIDE, short_side=24, clips_per_epoch=clips, seed=3, **kw)


def _batches(ds, workers=0):
    loader = ClipLoader(ds, B, num_workers=workers, multiprocessing_context=worker_context(workers))
    try:
        return [{k: v.clone() for k, v in to_clip_chw(b).items()} for b in loader], loader
    finally:
        loader.close()


def test_lane_order_is_a_permutation_and_mixes_lanes():
    q = lane_order(100, 16, 16)
    assert sorted(q.tolist()) == list(range(100))
    counts = np.bincount(np.arange(100) % 16, minlength=16)  # lane l holds the l-th contiguous part
    bounds = np.cumsum(counts)
    for b in range(100 // 16):  # every batch takes one clip from each of the 16 parts
        assert sorted(np.searchsorted(bounds, q[b * 16: (b + 1) * 16], side="right").tolist()) == list(range(16))


def test_batches_cover_14_of_16_windows_at_a_low_decode_ratio(test_videos):
    """The reference's random starts give 14-16 distinct windows per batch of 16; the old loader gave ~3."""
    ds = _dataset(test_videos("long60"))  # 960 frames: 120 windows of T x stride = 8 frames
    batches, _ = _batches(ds)
    assert len(batches) == 480 // B
    windows = [distinct_windows(b["video"].numpy(), b["start"].numpy(), T * STRIDE) for b in batches]
    assert np.mean(windows) >= 14, windows
    st = ds.stats()
    assert st["delivered_frames"] == 480 * T
    assert st["ratio"] <= 1.5, st
    for b in batches[::7]:  # the pixels are the frames the batch names (barcodes)
        for clip, frames in zip(b["clip"][:3], b["frames"][:3]):
            assert [read_barcode(f) for f in clip.numpy()] == frames.tolist()
    assert sorted(torch.cat([b["sample"] for b in batches]).tolist()) == list(range(480))


def test_workers_deliver_the_same_batches_and_resume_exactly(test_videos):
    ds = _dataset(test_videos("h264"), clips=96)
    inline, _ = _batches(ds, 0)
    workers, loader = _batches(ds, 2)
    assert len(inline) == len(workers) == 6
    for a, b in zip(inline, workers):
        assert torch.equal(a["sample"], b["sample"]) and torch.equal(a["start"], b["start"])
        assert torch.equal(a["clip"], b["clip"])
    plan = ds.loader_plan(0, 0, B)
    assert loader.pool_clips <= held_clips(plan, B) * 5 // 4 + 2 * int(plan.task_sizes.max()) + 1  # bounded
    ds.set_start(2 * B)  # killed after 2 steps: the rest is the same batches, with workers too
    rest, _ = _batches(ds, 2)
    assert len(rest) == 4
    for a, b in zip(rest, inline[2:]):
        assert torch.equal(a["sample"], b["sample"]) and torch.equal(a["clip"], b["clip"])


def test_i420_transport_matches_pyav_rgb(test_videos):
    """Frames travel as I420 planes and become RGB on the device: the same pixels as PyAV's RGB, +-3."""
    from wtours.video.decode import make_geometry, open_video
    from wtours.video.index import index_video

    v = test_videos("long30")
    ds = ClipDataset([v], frames_per_clip=2, stride=10, short_side=36, clips_per_epoch=16, seed=0)
    assert ds.pixel_format == "yuv420p"
    (b,), _ = _batches(ds)
    idx = index_video(v)
    f = open_video(v, "pyav", index=idx)
    frames = b["frames"][0].numpy()
    ref = np.stack([a for _, a in f.iter_frames(np.sort(frames), make_geometry(idx.width, idx.height, 36, 16 / 9))])
    f.close()
    got = b["clip"][0].permute(0, 2, 3, 1).numpy().astype(int)
    order = np.argsort(frames)
    assert np.abs(got[order] - ref.astype(int)).max() <= 3


def test_hue_is_computed_once_and_matches_the_all_slots_formula():
    """apply_photometric rotates the hue once per image, in its slot: the same images as evaluating the
    hue op in every slot (identity where the slot holds another op), as before issue 12."""
    gen = torch.Generator().manual_seed(0)
    n = 24
    p = sample_photometric(gen, n, 0.8, 0.4, 0.4, 0.2, 0.1, 0.2, 0.5, (0.1, 2.0))
    assert (p.hue == 0).any() and (p.hue != 0).any()
    x = torch.rand(n, 3, 12, 12, generator=gen)

    def all_slots(x):
        import kornia as K

        from wtours.stages.video.augment import gaussian_blur, rgb_to_gray

        ident = torch.ones_like(p.brightness)
        for slot in range(4):
            op = p.order[:, slot]
            x = K.enhance.adjust_brightness_accumulative(x, torch.where(op == 0, p.brightness, ident))
            x = K.enhance.adjust_contrast_with_mean_subtraction(x, torch.where(op == 1, p.contrast, ident))
            x = K.enhance.adjust_saturation_with_gray_subtraction(x, torch.where(op == 2, p.saturation, ident))
            x = torch.where((op == 3).view(-1, 1, 1, 1), adjust_hue(x, torch.where(op == 3, p.hue, 0.0 * ident)), x)
        x = torch.where(p.gray.view(-1, 1, 1, 1), rgb_to_gray(x).expand_as(x), x)
        return torch.where(p.blur.view(-1, 1, 1, 1), gaussian_blur(x, p.sigma, 2.0), x)

    assert torch.allclose(apply_photometric(x, p, 2.0), all_slots(x), atol=1e-5)


@pytest.mark.parametrize("short, expect_proxy", [(24, True), (80, False)])
def test_proxy_auto_transcodes_once_when_the_source_is_larger(test_videos, short, expect_proxy):
    from wtours.video.index import index_video
    from wtours.video.prepare import training_videos

    v = str(test_videos("long30"))  # 64x36
    got = training_videos([v], short, "auto", progress=False)
    assert (got[0] != v) == expect_proxy
    if expect_proxy:
        assert min(index_video(got[0]).width, index_video(got[0]).height) == short
        again = training_videos([v], short, "auto", progress=False)
        assert again == got  # cached, not made again
    assert training_videos([v], short, "off", progress=False) == [v]
