"""wtours.video.synth: the synthetic walking tour (video + DAVIS / YTVOS layouts)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from wtours.cli import main
from wtours.errors import UserError
from wtours.video import synth
from wtours.video.synth import CATEGORIES, Scene, davis_palette, render_scene, synthesize, write_davis_like

W, H, FPS, SECONDS, SEQS, SEQ_FRAMES = 160, 96, 10.0, 2.0, 2, 6


def _make(out: Path, seed: int = 3):
    return synthesize(out, width=W, height=H, fps=FPS, seconds=SECONDS, gop=5, sequences=SEQS,
                      seq_frames=SEQ_FRAMES, objects=4, seed=seed, progress=False)


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("synth") / "a")


@pytest.fixture(scope="module")
def tour_again(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("synth") / "b")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(path: Path) -> tuple[list[np.ndarray], list[bool], av.video.stream.VideoStream]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames, keys = [], []
        for f in c.decode(s):
            frames.append(f.to_ndarray(format="rgb24"))
            keys.append(bool(f.key_frame))
        return frames, keys, (s.width, s.height, float(s.average_rate), s.codec_context.name)


# ---------------------------------------------------------------------------------------------- layout


def test_result_paths(tour):
    assert tour.video.name == "tour.mp4" and tour.video.is_file()
    assert tour.davis_root.is_dir() and tour.ytvos_root.is_dir() and tour.meta.is_file()
    assert not [p for p in tour.video.parent.rglob(".*")], "temp files left behind"


def test_davis_layout(tour):
    root = tour.davis_root
    seqs = (root / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert len(seqs) == SEQS
    assert (root / "ImageSets" / "2017" / "train.txt").read_text().split() == seqs
    assert sorted(p.name for p in (root / "JPEGImages" / "480p").iterdir()) == sorted(seqs)
    meta = json.loads(tour.meta.read_text())
    names = [f"{k:05d}" for k in range(SEQ_FRAMES)]
    for seq in seqs:
        jpgs = sorted((root / "JPEGImages" / "480p" / seq).iterdir())
        pngs = sorted((root / "Annotations" / "480p" / seq).iterdir())
        assert [p.stem for p in jpgs] == names and all(p.suffix == ".jpg" for p in jpgs)
        assert [p.stem for p in pngs] == names and all(p.suffix == ".png" for p in pngs)
        ids = set()
        for j, p in zip(jpgs, pngs):
            im, m = Image.open(j), Image.open(p)
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (W, H)
            assert m.mode == "P" and m.size == (W, H)
            assert m.getpalette()[:12] == davis_palette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
            ids |= set(np.unique(np.asarray(m)).tolist())
        n = max(ids)
        assert ids == set(range(n + 1)) and n >= 2, "instance ids must be contiguous 0..n"
        cats = meta["davis"]["sequences"][seq]
        assert sorted(cats, key=int) == [str(i) for i in range(1, n + 1)]
        assert set(cats.values()) <= set(CATEGORIES)


def test_ytvos_layout_and_meta(tour):
    root = tour.ytvos_root
    meta = json.loads((root / "train" / "meta.json").read_text())
    vids = (root / "val.txt").read_text().split()
    assert sorted(vids) == sorted(meta["videos"]) and len(vids) == SEQS
    names = [f"{5 * k:05d}" for k in range(SEQ_FRAMES)]
    synth_meta = json.loads(tour.meta.read_text())
    for vid in vids:
        assert len(vid) == 10 and int(vid, 16) >= 0
        jpgs = sorted(p.stem for p in (root / "train" / "JPEGImages" / vid).glob("*.jpg"))
        assert jpgs == names
        masks = {n: np.asarray(Image.open(root / "train" / "Annotations" / vid / f"{n}.png")) for n in names}
        assert all(Image.open(root / "train" / "Annotations" / vid / f"{n}.png").mode == "P" for n in names)
        objs = meta["videos"][vid]["objects"]
        present = set().union(*(set(np.unique(m).tolist()) for m in masks.values())) - {0}
        assert {int(k) for k in objs} == present == set(range(1, len(present) + 1))
        for k, o in objs.items():
            assert set(o) == {"category", "frames"} and o["category"] in CATEGORIES
            assert o["frames"] == [n for n in names if (masks[n] == int(k)).any()]
            assert synth_meta["ytvos"]["videos"][vid][k] == o["category"]


def test_synth_json(tour):
    meta = json.loads(tour.meta.read_text())
    p = meta["params"]
    assert (p["width"], p["height"], p["fps"], p["seed"], p["frames"]) == (W, H, FPS, 3, int(SECONDS * FPS))
    assert meta["categories"] == list(CATEGORIES)
    assert len(meta["video"]["frames"]) == int(SECONDS * FPS)
    assert set(meta["video"]["objects"].values()) == set(CATEGORIES)  # 4 objects: one of each
    for fr in meta["video"]["frames"]:
        assert set(fr["visible"]) <= set(fr["boxes"]) <= set(meta["video"]["objects"])
        assert 0 < sum(fr["visible"].values()) < 1


# ---------------------------------------------------------------------------------------------- video


def test_video_properties(tour):
    frames, keys, (w, h, fps, codec) = _decode(tour.video)
    assert (w, h, codec) == (W, H, "h264")
    assert fps == pytest.approx(FPS)
    assert len(frames) == int(SECONDS * FPS)
    assert [i for i, k in enumerate(keys) if k] == list(range(0, len(frames), 5))  # --gop 5
    with av.open(str(tour.video)) as c:
        assert c.streams.video[0].codec_context.pix_fmt == "yuv420p"


def test_video_matches_rendered_scene(tour):
    frames, _, _ = _decode(tour.video)
    scene = Scene(W, H, objects=4, seed=[3, 0, 0])
    for i in (0, len(frames) - 1):
        ref = scene.render(i / FPS).rgb.astype(np.int16)
        assert np.abs(frames[i].astype(np.int16) - ref).mean() < 8  # lossy codec, same content


@pytest.mark.parametrize("codec", ["hevc", "vp9", "av1"])
def test_other_codecs(tmp_path, codec):
    scene = Scene(64, 48, objects=2, seed=1)
    synth.write_video(tmp_path / "v.mp4", scene, 6, 12.0, codec=codec, gop=3, progress=False)
    frames, keys, (w, h, fps, name) = _decode(tmp_path / "v.mp4")
    assert (w, h, len(frames)) == (64, 48, 6) and fps == pytest.approx(12.0)
    assert keys[0] and keys[3] and not keys[1]
    with av.open(str(tmp_path / "v.mp4")) as c:
        assert c.streams.video[0].codec_context.codec.id == av.codec.Codec(synth.ENCODERS[codec][0], "w").id


# ---------------------------------------------------------------------------------------------- determinism


def test_deterministic_by_seed(tour, tour_again):
    for sub in ("davis", "ytvos"):
        a, b = _files(tour.video.parent / sub), _files(tour_again.video.parent / sub)
        assert a.keys() == b.keys() and a == b  # identical JPEG and PNG bytes
    assert tour.meta.read_bytes() == tour_again.meta.read_bytes()
    fa, _, _ = _decode(tour.video)
    fb, _, _ = _decode(tour_again.video)
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb)) and len(fa) == len(fb)


def test_other_seed_differs():
    a = Scene(96, 64, seed=0).render(0.5)
    b = Scene(96, 64, seed=1).render(0.5)
    assert not np.array_equal(a.rgb, b.rgb) and not np.array_equal(a.mask, b.mask)


# ---------------------------------------------------------------------------------------------- content


def test_objects_move_occlude_leave_and_enter():
    frames = list(render_scene(128, 72, frames=150, fps=15.0, objects=4, seed=0))  # 10 s
    vis = np.array([[(f.mask == i).sum() for i in range(1, 5)] for f in frames])  # [T, 4]
    assert all(f.rgb.shape == (72, 128, 3) and f.rgb.dtype == np.uint8 and f.mask.dtype == np.uint8 for f in frames)
    assert set(np.unique(np.stack([f.mask for f in frames])).tolist()) == {0, 1, 2, 3, 4}
    # moving: each object's mask changes between consecutive visible frames
    for k in range(4):
        both = [t for t in range(1, len(frames)) if vis[t, k] and vis[t - 1, k]]
        assert any(not np.array_equal(frames[t].mask == k + 1, frames[t - 1].mask == k + 1) for t in both)
    # occlusion: some object covers fewer pixels than it would alone
    occluded = sum((f.mask == i).sum() < a for f in frames for i, a in f.areas.items())
    assert occluded > 10
    # leave and re-enter: an instance visible, then absent, then visible again
    on = vis > 0
    assert any(on[:, k].any() and not on[:, k].all() for k in range(4))
    reenters = [k for k in range(4) if (np.diff(on[:, k].astype(int)) == 1).any()
                and (np.diff(on[:, k].astype(int)) == -1).any()]
    assert reenters
    # the depth order changes (who occludes whom is not fixed)
    depth = [tuple(sorted(f.areas, key=lambda i: (f.mask == i).sum() / max(f.areas[i], 1))) for f in frames]
    assert len(set(depth)) > 1


def test_categories_have_distinct_shapes():
    scene = Scene(320, 180, objects=4, seed=0)
    ratio = {o.category: o.alpha.shape[1] / o.alpha.shape[0] for o in scene.objects}
    assert ratio["person"] < 0.5 < ratio["bicycle"] and ratio["car"] > 2
    fill = {o.category: o.alpha.mean() for o in scene.objects}
    assert fill["bicycle"] < fill["car"]


def test_dataset_size_rule():
    assert synth._dataset_size(3840, 2160) == (854, 480)
    assert synth._dataset_size(1920, 1080) == (854, 480)
    assert synth._dataset_size(1080, 1920) == (480, 854)
    assert synth._dataset_size(640, 360) == (640, 360)


def test_write_davis_like_at_davis_size(tmp_path):
    cats = write_davis_like(tmp_path, sequences=1, seq_frames=3, height=480, width=854, seed=5)
    (seq,) = cats
    im = Image.open(tmp_path / "JPEGImages" / "480p" / seq / "00002.jpg")
    assert im.size == (854, 480)
    assert Image.open(tmp_path / "Annotations" / "480p" / seq / "00002.png").size == (854, 480)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("extra, needle", [
    (["--width", "161"], "even"),
    (["--height", "0"], "positive"),
    (["--fps", "-1"], "positive"),
    (["--seconds", "0"], "positive"),
    (["--codec", "mpeg2"], "unknown codec"),
    (["--width", "7680", "--height", "4320"], "3840x2160"),
    (["--objects", "0"], "positive"),
])
def test_cli_bad_input(tmp_path, capsys, extra, needle):
    rc = main(["synth", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # validated before anything is written


def test_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["synth", "--out", str(blocker / "sub"), "--seconds", "0.2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(blocker / "sub") in err


def test_missing_encoder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(synth.ENCODERS, "h266", ("libvvenc_not_built", {}))
    rc = main(["synth", "--out", str(tmp_path / "o"), "--codec", "h266"])
    err = capsys.readouterr().err
    assert rc == 2 and "not available" in err and err.count("\n") == 1
    with pytest.raises(UserError, match="not available"):
        synthesize(tmp_path / "o", codec="h266", progress=False)


def test_cli_end_to_end(tmp_path, capsys):
    rc = main(["synth", "--out", str(tmp_path / "o"), "--width", "64", "--height", "48", "--seconds", "0.5",
               "--sequences", "1", "--seq-frames", "2", "--objects", "2"])
    out = capsys.readouterr().out.split()
    assert rc == 0 and out[0] == str(tmp_path / "o" / "tour.mp4") and os.path.isfile(out[0])
