"""wtours.video.frames.FrameFolderClips: layouts, sampling, pixels, determinism, sharding, resume, errors."""

import logging
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from wtours.errors import UserError
from wtours.video.clips import worker_context
from wtours.video.frames import FrameFolderClips, list_frames
from wtours.video.synth import write_ytvos_like

H, W = 48, 86  # clip_size(48, 16/9)


@pytest.fixture(scope="module")
def ytvos(tmp_path_factory):
    """A YouTube-VOS-like tree: ``train/JPEGImages/<vid>/00000.jpg, 00005.jpg, ...``, 3 videos x 8 frames."""
    root = tmp_path_factory.mktemp("ytvos")
    meta = write_ytvos_like(root, videos=3, seq_frames=8, height=96, width=160)
    return root, sorted(meta["videos"])


def _copy(ytvos, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(ytvos[0] / "train" / "JPEGImages", root / "JPEGImages")
    return root


def _reference(path, short_side=48, aspect=16 / 9):
    """Upright RGB, scaled (bilinear) to cover the clip size, centre-cropped: uint8 [3, H, W]."""
    from PIL import ImageOps

    from wtours.video.decode import clip_size

    oh, ow = clip_size(short_side, aspect)
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        f = max(oh / h, ow / w)
        sw, sh = max(ow, round(w * f)), max(oh, round(h * f))
        im = im.resize((sw, sh), Image.BILINEAR)
        x, y = (sw - ow) // 2, (sh - oh) // 2
        return np.asarray(im)[y: y + oh, x: x + ow].transpose(2, 0, 1)


def _keys(items):
    return [(it["sample"], it["video"], tuple(it["frames"].tolist())) for it in items]


def _unbatch(b):
    return [{k: (b[k][i].item() if b[k][i].ndim == 0 else b[k][i]) for k in b} for i in range(b["clip"].shape[0])]


def test_three_layouts_are_found(ytvos):
    root, vids = ytvos
    for given in (root, root / "train", root / "train" / "JPEGImages"):  # train/JPEGImages, JPEGImages, direct
        ds = FrameFolderClips(given, short_side=48, clips_per_epoch=3)
        assert ds.videos == vids and ds.frames_root == root / "train" / "JPEGImages"
        assert [len(f) for f in ds.frame_files] == [8, 8, 8] and ds.skipped_videos == 0
        assert ds.frame_files[0][:3] == ["00000.jpg", "00005.jpg", "00010.jpg"]
    ds = FrameFolderClips(root, short_side=48, clips_per_epoch=3, videos=root / "val.txt")  # a list file
    assert ds.videos == (root / "val.txt").read_text().split() and sorted(ds.videos) == vids  # in list order
    ds = FrameFolderClips(root, short_side=48, clips_per_epoch=3, videos=[vids[2], vids[0]])
    assert ds.videos == [vids[2], vids[0]] and {it["video"] for it in ds} == {0, 1}


def test_frame_files_natural_order_and_ignored_files(tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    for n in ("10.jpg", "2.JPG", "1.jpeg", "3.png", ".4.jpg", "notes.txt", "5.gif"):
        (d / n).write_bytes(b"")
    (d / "6.jpg").mkdir()
    assert list_frames(d) == ["1.jpeg", "2.JPG", "3.png", "10.jpg"]


@pytest.mark.parametrize("sampling", ["uniform", "dense", "stride"])
def test_clip_shape_sampling_and_pixels(ytvos, sampling):
    root, _ = ytvos
    ds = FrameFolderClips(root, frames_per_clip=3, stride=3, short_side=48, clips_per_epoch=12,
                          sampling=sampling, draft=False)
    assert ds.clip_shape == (3, 3, H, W) and len(ds) == 12
    items = list(ds)
    assert [it["sample"] for it in items] == list(range(12))
    for it in items:
        c, fr = it["clip"], it["frames"].tolist()
        assert c.dtype == torch.uint8 and tuple(c.shape) == ds.clip_shape and it["frames"].dtype == torch.int64
        assert it["start"] == fr[0] and 0 <= fr[0] and fr[-1] < 8
        steps = np.diff(fr).tolist()
        if sampling == "uniform":
            assert all(s > 0 for s in steps)  # sorted and distinct
        else:
            assert steps == [1 if sampling == "dense" else 3] * 2
    starts = {it["start"] for it in items}
    assert len(starts) > 1  # random starts, not always the first frame
    for it in items[:4]:
        d = ds.video_dir(it["video"])
        for j, k in enumerate(it["frames"].tolist()):
            assert np.array_equal(it["clip"][j].numpy(), _reference(d / ds.frame_files[it["video"]][k]))


def test_draft_decode_is_close_to_the_exact_one(ytvos):
    root, _ = ytvos  # 160x96 frames to 42x24: libjpeg decodes at 1/2 scale
    fast = FrameFolderClips(root, short_side=24, clips_per_epoch=4)
    exact = FrameFolderClips(root, short_side=24, clips_per_epoch=4, draft=False)
    for a, b in zip(fast, exact):
        assert a["frames"].tolist() == b["frames"].tolist()
        diff = (a["clip"].int() - b["clip"].int()).abs().float().mean().item()
        assert diff < 4, diff


def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((96, 160, 3), np.uint8)
    img[:, :40] = 255  # stored: white left quarter
    d = tmp_path / "JPEGImages" / "phone"
    d.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # display turned 90 degrees clockwise: a 96 wide, 160 high portrait
    for k in range(2):
        Image.fromarray(img).save(d / f"{k:05d}.jpg", exif=exif, quality=95)
    for short_side in (48, 24):  # 24: the turned JPEG is also decoded at 1/2 scale (draft)
        oh, ow = (86, 48) if short_side == 48 else (42, 24)
        ref = _reference(d / "00000.jpg", short_side, 9 / 16)
        for draft in (False, True):
            ds = FrameFolderClips(tmp_path, frames_per_clip=2, short_side=short_side, aspect=9 / 16,
                                  clips_per_epoch=1, draft=draft)
            clip = ds.get(0)["clip"][0].numpy()
            assert clip.shape == (3, oh, ow)  # upright portrait
            assert clip[:, : oh // 4].mean() > 200 and clip[:, -oh // 4:].mean() < 50  # stored left is on top
            if draft:
                assert np.abs(clip.astype(int) - ref).mean() < 4
            else:
                assert np.array_equal(clip, ref)


def test_deterministic_for_seed_and_epoch(ytvos):
    root, _ = ytvos
    mk = lambda seed: FrameFolderClips(root, short_side=24, clips_per_epoch=9, seed=seed)  # noqa: E731
    a, b = list(mk(0)), list(mk(0))
    assert _keys(a) == _keys(b)
    assert all(torch.equal(x["clip"], y["clip"]) for x, y in zip(a, b))
    assert _keys(list(mk(1))) != _keys(a)
    ds = mk(0)
    ds.set_epoch(1)
    assert _keys(list(ds)) != _keys(a)
    assert _keys(list(pickle.loads(pickle.dumps(mk(0))))) == _keys(a)
    one = lambda seed: FrameFolderClips(root, short_side=24, clips_per_epoch=9, seed=seed,  # noqa: E731
                                        videos=[ds.videos[0]])
    frames = lambda d: [it["frames"].tolist() for it in d]  # noqa: E731
    assert frames(one(0)) == frames(one(0)) != frames(one(1))  # the frames too depend on the seed
    o = one(0)
    o.set_epoch(1)
    assert frames(o) != frames(one(0))  # ... and on the epoch


def test_ranks_split_one_epoch(ytvos):
    root, _ = ytvos
    whole = FrameFolderClips(root, short_side=24, clips_per_epoch=14, rank=0, world_size=1)
    whole.set_epoch(3)
    parts = []
    for rank in range(2):
        ds = FrameFolderClips(root, short_side=24, clips_per_epoch=13, rank=rank, world_size=2)
        ds.set_epoch(3)
        items = list(ds)
        assert len(items) == len(ds) == 7  # ceil(13 / 2) each: DDP never waits for a short rank
        assert [it["sample"] for it in items] == list(range(7))
        parts.append([(it["video"], tuple(it["frames"].tolist())) for it in items])
    assert parts[0] != parts[1]
    # rank r holds the r-th contiguous part of the same epoch (of world * 7 clips)
    assert parts[0] + parts[1] == [(it["video"], tuple(it["frames"].tolist())) for it in whole]


def test_set_start_with_workers_resumes_the_same_stream(ytvos):
    root, _ = ytvos
    ds = FrameFolderClips(root, short_side=24, clips_per_epoch=12, batch_size=2)
    ds.set_epoch(1)
    dl = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=worker_context(2),
                    persistent_workers=True)
    full = [x for b in dl for x in _unbatch(b)]
    assert [x["sample"] for x in full] == list(range(12))  # delivered in sample order
    assert ds.stats()["delivered_frames"] == 12 * 4  # counted in the workers, read here
    ds.set_start(6)  # 3 batches done: resumes at a batch boundary that is not a worker boundary
    rest = [x for b in dl for x in _unbatch(b)]  # the persistent workers see set_start
    assert _keys(rest) == _keys(full[6:])
    assert all(torch.equal(a["clip"], b["clip"]) for a, b in zip(rest, full[6:]))


def test_every_video_used_about_equally_often(ytvos):
    root, _ = ytvos
    ds = FrameFolderClips(root, short_side=24, clips_per_epoch=31, seed=5)
    counts = np.zeros(3, int)
    for e in range(2):
        vids, frames = ds.rank_clips(e)
        c = np.bincount(vids, minlength=3)
        assert c.max() - c.min() <= 1, c  # within one epoch
        counts += c
    assert counts.max() - counts.min() <= 1, counts  # and over consecutive epochs
    ds.set_epoch(1)
    items = list(ds)  # iteration delivers the plan
    assert [it["video"] for it in items] == vids.tolist()
    assert np.array_equal(np.stack([it["frames"].numpy() for it in items]), frames)


def _one_line_error(match, *args, **kw):
    with pytest.raises(UserError) as e:
        FrameFolderClips(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    return msg


def test_one_line_errors(ytvos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _one_line_error(str(empty), empty)
    assert "no JPEG frames under" in msg and "train/JPEGImages/<video>" in msg
    txt = tmp_path / "txt"
    (txt / "JPEGImages" / "v1").mkdir(parents=True)
    (txt / "JPEGImages" / "v1" / "00000.txt").write_text("x")
    _one_line_error("no JPEG frames under " + str(txt), txt)
    _one_line_error(str(tmp_path / "nope"), tmp_path / "nope")
    root, vids = ytvos
    msg = _one_line_error("'zzz_missing'", root, videos=[vids[0], "zzz_missing", "yyy"])
    assert str(root / "train" / "JPEGImages") in msg and "1 more" in msg
    _one_line_error(str(tmp_path / "list.txt"), root, videos=tmp_path / "list.txt")
    _one_line_error("the longest has 8", root, frames_per_clip=4, stride=3, sampling="stride")  # span 10
    _one_line_error("unknown clip sampling", root, sampling="random")


def test_short_videos_are_skipped_and_counted(ytvos, tmp_path, caplog):
    root = _copy(ytvos, tmp_path)
    short = ytvos[1][1]
    for f in sorted((root / "JPEGImages" / short).iterdir())[3:]:
        f.unlink()
    (root / "JPEGImages" / "no_frames").mkdir()
    with caplog.at_level(logging.WARNING, logger="wtours.video.frames"):
        ds = FrameFolderClips(root, frames_per_clip=4, short_side=24, sampling="dense", clips_per_epoch=4)
    assert ds.skipped_videos == 2 and short not in ds.videos and len(ds.videos) == 2
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "skipped 2 of 4" in lines[0]
    uni = FrameFolderClips(root, frames_per_clip=4, short_side=24, clips_per_epoch=30)  # uniform: with replacement
    assert uni.skipped_videos == 1 and short in uni.videos
    v = uni.videos.index(short)
    for it in uni:
        if it["video"] == v:
            fr = it["frames"].tolist()
            assert fr == sorted(fr) and max(fr) < 3


def test_corrupt_frame_is_replaced_and_counted(ytvos, tmp_path):
    root = _copy(ytvos, tmp_path)
    vid = ytvos[1][0]
    d = root / "JPEGImages" / vid
    (d / "00015.jpg").write_bytes(b"\x00garbage" * 50)  # frame 3
    ds = FrameFolderClips(root, frames_per_clip=8, short_side=24, sampling="dense", clips_per_epoch=3,
                          videos=[vid])
    items = list(ds)
    assert len(items) == 3
    for it in items:
        assert it["frames"].tolist() == [0, 1, 2, 2, 4, 5, 6, 7]  # the nearest readable frame
        assert torch.equal(it["clip"][3], it["clip"][2])
    st = ds.stats()
    assert st["bad_frames"] == 3 and st["delivered_frames"] == 24
    for f in d.iterdir():
        f.write_bytes(b"junk")
    ds = FrameFolderClips(root, frames_per_clip=8, short_side=24, sampling="dense", clips_per_epoch=3)
    with pytest.raises(UserError) as e:
        list(ds)
    assert str(d) in str(e.value) and "no readable frame" in str(e.value) and "\n" not in str(e.value)
