"""wtours.video.clips.ClipDataset: shapes, determinism, sharding, resume, coverage, decode ratio."""

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import read_barcode
from wtours.errors import VideoError
from wtours.video.clips import ClipDataset, clip_span_frames, worker_context
from wtours.video.index import index_video


def _keys(items):
    return [(it["sample"], it["video"], it["start"]) for it in items]


def _check_frames(it, stride):
    T = it["frames"].numel()
    assert it["frames"].tolist() == [it["start"] + j * stride for j in range(T)]
    assert [read_barcode(f) for f in it["clip"].numpy()] == it["frames"].tolist()


def test_shapes_frames_and_mixed_aspect_ratios(test_videos):
    vids = [test_videos("long60"), test_videos("h264")]  # 64x36 (16:9) and 160x96 (5:3)
    # one cycle of the clip stream holds ~1/T of each video's starts (~350 clips here): the epoch covers it
    ds = ClipDataset(vids, frames_per_clip=3, stride=5, short_side=36, clips_per_epoch=360,
                     min_segment_frames=15)
    items = list(ds)
    assert len(items) == len(ds) == 360
    assert {it["video"] for it in items} == {0, 1}
    for it in items:
        assert it["clip"].dtype == torch.uint8 and tuple(it["clip"].shape) == (3, 3, 36, 64)
        assert it["frames"].dtype == torch.int64
        _check_frames(it, 5)
    batch = next(iter(DataLoader(ds, batch_size=4)))  # default collate across videos
    assert tuple(batch["clip"].shape) == (4, 3, 3, 36, 64)
    assert sorted(it["sample"] for it in items) == list(range(360))


def test_deterministic_for_seed_and_epoch(test_videos):
    mk = lambda seed: ClipDataset([test_videos("h264")], frames_per_clip=2, stride=3, short_side=24,  # noqa: E731
                                  clips_per_epoch=30, seed=seed)
    a, b = mk(0), mk(0)
    ka = _keys(list(a))
    assert ka == _keys(list(b)) == _keys(list(a))
    a.set_epoch(1)
    b.set_epoch(1)
    assert _keys(list(a)) == _keys(list(b)) != ka
    assert _keys(list(mk(1))) != ka


def test_shards_do_not_overlap_across_ranks_and_workers(test_videos):
    v = [test_videos("h264")]  # 120 frames
    seen = []
    per_rank = []
    for rank in range(2):
        ds = ClipDataset(v, frames_per_clip=2, stride=2, short_side=24, clips_per_epoch=41, rank=rank,
                         world_size=2, batch_size=3)
        dl = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context=worker_context(2))
        items = [x for b in dl for x in _unbatch(b)]
        per_rank.append(len(items))
        assert [it["sample"] for it in items] == list(range(21))  # delivered in sample order
        seen += [(it["video"], it["start"]) for it in items]
        assert ds.stats()["delivered_frames"] == 21 * 2  # counted in the workers, read here
    assert per_rank == [21, 21]  # ceil(41 / 2) each: DDP never waits for a short rank
    assert len(seen) == len(set(seen)) == 42


def _unbatch(b):
    n = b["clip"].shape[0]
    return [{k: (b[k][i].item() if b[k][i].ndim == 0 else b[k][i]) for k in b} for i in range(n)]


def test_set_start_skips_exactly(test_videos):
    ds = ClipDataset([test_videos("h264")], frames_per_clip=2, stride=4, short_side=24, clips_per_epoch=20)
    ds.set_epoch(2)
    full = list(ds)
    ds.set_start(7)
    rest = list(ds)
    assert _keys(rest) == [k for k in _keys(full) if k[0] >= 7]
    for a, b in zip(rest, [x for x in full if x["sample"] >= 7]):
        assert torch.equal(a["clip"], b["clip"])
    ds.set_epoch(3)  # a new epoch starts from its beginning
    assert len(list(ds)) == 20


def test_set_start_with_workers_resumes_the_same_stream(test_videos):
    ds = ClipDataset([test_videos("h264")], frames_per_clip=2, stride=4, short_side=24, clips_per_epoch=24,
                     batch_size=4)
    ctx = worker_context(2)
    order = lambda: [(x["sample"], x["start"])  # noqa: E731
                     for b in DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=ctx) for x in _unbatch(b)]
    full = order()
    assert [s for s, _ in full] == list(range(24))
    ds.set_start(12)  # 3 batches done: resumes at a batch boundary that is not a worker boundary
    assert order() == full[12:]


def test_coverage_over_epochs(test_videos):
    v = test_videos("h264")
    T, s = 3, 2
    ds = ClipDataset([v], frames_per_clip=T, stride=s, short_side=24, clips_per_epoch=29)
    valid = index_video(v).num_frames - clip_span_frames(index_video(v), T, s, "frames") + 1
    starts = []
    for e in range(4):
        ds.set_epoch(e)
        starts += [it["start"] for it in ds]
    assert set(starts[:valid]) == set(range(valid))  # the first `valid` clips use every start once


@pytest.mark.parametrize("name", ["long60", "long30"])
def test_decode_ratio_at_default_clip_settings(name, test_videos):
    ds = ClipDataset([test_videos(name)], short_side=24, clips_per_epoch=120)  # T=8, stride 60 frames
    items = list(ds)
    assert len(items) == 120
    for it in items[::10]:
        _check_frames(it, 60)
    st = ds.stats()
    assert st["delivered_frames"] == 960
    assert st["ratio"] <= 1.5, st
    assert st["corrupt_packets"] == 0


def test_seconds_stride_and_span_helper(test_videos):
    idx = index_video(test_videos("long60"))
    assert clip_span_frames(idx, 8, 60) == 421
    assert clip_span_frames(idx, 8, 0.5, "seconds") == 7 * 30 + 1
    ds = ClipDataset([test_videos("long60")], frames_per_clip=4, stride=0.25, stride_unit="seconds",
                     short_side=24, clips_per_epoch=5)
    it = next(iter(ds))
    _check_frames(it, 15)


def test_too_short_video_is_a_one_line_error(test_videos):
    v = test_videos("h264")  # 120 frames, a default clip spans 421
    with pytest.raises(VideoError) as e:
        ClipDataset([v])
    msg = str(e.value)
    assert str(v) in msg and "120 frames" in msg and "421" in msg and "\n" not in msg


def test_picklable_and_works_in_spawned_workers(test_videos):
    ds = ClipDataset([test_videos("h264")], frames_per_clip=2, stride=4, short_side=24, clips_per_epoch=6)
    expect = _keys(list(ds))
    clone = pickle.loads(pickle.dumps(ds))
    assert _keys(list(clone)) == expect
    dl = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    got = list(dl)
    assert [(x["sample"], x["video"], x["start"]) for x in got] == expect


def test_decord_backend_refuses_hevc_at_construction(test_videos):
    pytest.importorskip("decord")
    with pytest.raises(VideoError, match="HEVC"):
        ClipDataset([test_videos("hevc")], frames_per_clip=2, stride=2, backend="decord")
    ds = ClipDataset([test_videos("h264")], frames_per_clip=2, stride=4, short_side=24, clips_per_epoch=4,
                     backend="decord")
    for it in ds:
        _check_frames(it, 4)


def test_portrait_phone_footage_is_trained_upright(tmp_path):
    from conftest import write_barcode_video

    # stored 160x96 landscape with "turn 90 degrees clockwise" (display matrix -90): a portrait clip
    v = write_barcode_video(tmp_path / "portrait.mp4", "libx264", 40, 160, 96, display_rotation=(-90, False, False),
                            options={"preset": "ultrafast", "x264-params": "keyint=10:min-keyint=10:scenecut=0"})
    ds = ClipDataset([v], frames_per_clip=2, stride=3, short_side=48, aspect=9 / 16, clips_per_epoch=6)
    for it in ds:
        clip = it["clip"].numpy()  # [T, 3, H, W]
        assert clip.shape == (2, 3, 86, 48)  # portrait: 48 wide, 86 high (clip_size(48, 9/16))
        frames = clip.transpose(0, 2, 3, 1)
        # turning the displayed frame back counter-clockwise gives the stored barcode
        assert [read_barcode(np.rot90(f, 1)) for f in frames] == it["frames"].tolist()
    with pytest.raises(VideoError, match="rotated"):
        pytest.importorskip("decord")
        ClipDataset([v], frames_per_clip=2, stride=3, backend="decord")
