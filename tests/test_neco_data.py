"""Stage-2 data: image folders (unreadable files skipped and counted), the frame cache, the resumable order,
and the --init encoder loader (stage-1 backbone, timm state dict, DINOv2 weights, not-a-ViT)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wtours.errors import UserError
from wtours.stages.neco.data import FrameCache, ImageFolder, ResumableSampler, build_frame_cache, list_images, plan_frames


def _png(path, h=40, w=60, value=100):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[:, : w // 2] = 255 - value
    Image.fromarray(arr).save(path)
    return path


def test_image_folder_any_depth_long_side_canvas_and_skipped_files(tmp_path):
    _png(tmp_path / "a" / "b" / "one.PNG", 40, 60)
    _png(tmp_path / "two.jpg", 80, 20)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "c" / "broken.jpg").parent.mkdir()
    (tmp_path / "c" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    files = list_images(tmp_path)
    assert [f.name for f in files] == ["one.PNG", "broken.jpg", "two.jpg"]
    ds = ImageFolder(tmp_path, image_size=30)
    item = ds[0]
    assert item["image"].shape == (3, 30, 30) and item["image"].dtype == torch.uint8
    assert item["size"].tolist() == [20, 30] and item["skipped"] == 0  # long side 60 -> 30, aspect kept
    assert torch.equal(item["image"][:, 20:], item["image"][:, 19:20].expand(3, 10, 30))  # edge padding
    skipped = ds[1]  # the broken file: the next readable image instead, counted
    assert skipped["skipped"] == 1 and "broken.jpg" in skipped["bad"] and skipped["ok"]
    assert skipped["size"].tolist() == [30, 8]  # two.jpg (80 x 20 -> 30 x 8)


def test_folders_without_readable_images_are_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="no images") as e:
        list_images(tmp_path)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        list_images(tmp_path / "missing")
    for i in range(3):
        (tmp_path / f"x{i}.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="none of the 3 images tried can be read") as e:
        ImageFolder(tmp_path, 32)
    assert "\n" not in str(e.value)


def test_frame_plan_spreads_frames_by_length():
    plans = plan_frames([100, 300], 40, "even", 0)
    assert [len(p) for p in plans] == [10, 30]
    assert plans[0][0] == 0 and plans[0][-1] == 99 and bool((np.diff(plans[1]) > 0).all())
    rnd = plan_frames([100, 300], 40, "random", 0)
    assert [len(p) for p in rnd] == [10, 30] and not np.array_equal(rnd[1], plans[1])
    assert sum(len(p) for p in plan_frames([3, 3], 50, "even", 0)) == 6  # never more frames than a video has


@pytest.mark.slow
def test_frame_cache_is_decoded_once_and_reused(tmp_path, test_videos):
    video = str(test_videos("long30"))  # 600 barcode frames, 64 x 36
    from conftest import read_barcode

    npy = build_frame_cache([video], tmp_path / "frames", frames=12, short_side=36, mode="even", seed=0)
    ds = FrameCache(npy)
    assert len(ds) == 12
    item = ds[3]
    assert item["image"].shape == (3, 36, 64) and item["size"].tolist() == [36, 64]
    want = np.round(np.linspace(0, 599, 12)).astype(int)
    assert [read_barcode(ds[i]["image"].numpy()) for i in range(12)] == want.tolist()
    mtime = npy.stat().st_mtime_ns
    again = build_frame_cache([video], tmp_path / "frames", frames=12, short_side=36, mode="even", seed=0)
    assert again == npy and npy.stat().st_mtime_ns == mtime  # reused, not decoded again
    build_frame_cache([video], tmp_path / "frames", frames=6, short_side=36, mode="even", seed=0)
    assert len(FrameCache(npy)) == 6  # other settings: rebuilt


def test_sampler_resumes_mid_stream_and_shards_ranks():
    full = ResumableSampler(10, seed=3)
    it = iter(full)
    stream = [next(it) for _ in range(35)]
    assert sorted(stream[:10]) == list(range(10)) and stream[:10] != stream[10:20]  # a new order per epoch
    resumed = iter(ResumableSampler(10, seed=3, start=17))
    assert [next(resumed) for _ in range(18)] == stream[17:]
    r0, r1 = ResumableSampler(10, 3, rank=0, world=2), ResumableSampler(10, 3, rank=1, world=2)
    a, b = iter(r0), iter(r1)
    first0, first1 = [next(a) for _ in range(5)], [next(b) for _ in range(5)]
    assert not set(first0) & set(first1) and len(set(first0 + first1)) == 10


# ----------------------------------------------------------------------------- --init


def test_init_from_a_stage1_backbone_and_a_random_spec(tmp_path):
    from wtours.models.weights import create_vit, export_backbone
    from wtours.models.weights import build_vit, load_init

    torch.manual_seed(0)
    m = create_vit("vit_nano_patch8_64", num_classes=0)
    export_backbone(m, "vit_nano_patch8_64", tmp_path / "backbone.pt", {"stage": "dora"})
    w = load_init(str(tmp_path / "backbone.pt"))
    assert w.arch == "vit_nano_patch8_64" and w.info["kind"] == "backbone"
    vit = build_vit(w.arch, w.state_dict)
    assert torch.equal(vit.state_dict()["blocks.0.attn.qkv.weight"], m.state_dict()["blocks.0.attn.qkv.weight"])
    r = load_init("random:vit_nano_patch8_64@1")
    assert r.arch == "vit_nano_patch8_64" and not torch.equal(r.state_dict["cls_token"], w.state_dict["cls_token"])


def test_init_converts_dinov2_weights_and_drops_registers(tmp_path):
    import timm

    from wtours.models.weights import build_vit, load_init

    ref = timm.create_model("vit_small_patch14_dinov2", num_classes=0, dynamic_img_size=True).eval()
    sd = dict(ref.state_dict())
    sd["register_tokens"] = torch.randn(1, 4, 384)  # Meta's DINOv2-reg layout
    sd["mask_token"] = torch.zeros(1, 384)
    for k in [k for k in sd if k.startswith("blocks.")]:  # block_chunks = 1: blocks.0.<i>.
        sd["blocks.0." + k[len("blocks."):]] = sd.pop(k)
    torch.save(sd, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    w = load_init(str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    assert w.arch == "vit_small_patch14_dinov2" and w.info["kind"] == "dinov2"
    assert "register_tokens" not in w.state_dict and "mask_token" not in w.state_dict
    vit = build_vit(w.arch, w.state_dict).eval()
    x = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x), ref.forward_features(x), atol=1e-5)


def test_init_that_is_not_a_vit_fails_in_one_line(tmp_path):
    import torchvision

    from wtours.models.weights import load_init

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    for spec, pattern in ((str(tmp_path / "resnet18.pth"), "not a ViT"), ("random:resnet18", "not a ViT"),
                          (str(tmp_path / "nope.pt"), "not found"), ("", "--init")):
        with pytest.raises(UserError, match=pattern) as e:
            load_init(spec)
        assert "\n" not in str(e.value) and "--init" in str(e.value)


def test_frame_cache_refuses_in_one_line_when_the_disk_cannot_hold_it(tmp_path, test_videos, monkeypatch, capsys):
    """Issue 20 #5: on a full disk the memory-mapped cache died with SIGBUS (exit 135, no message)."""
    import shutil
    from collections import namedtuple

    from wtours.cli import main

    video = str(test_videos("long30"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - 50_000, 50_000))
    rc = main(["neco", "--init", "random:vit_nano_patch8_64", "--frames-from", video, "--config", "neco/tiny",
               "--out", str(tmp_path / "run"), "--set", "data.frames=12", "--set", "log.progress=false"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"wtours neco: error: {tmp_path / 'run' / 'stage2' / 'frames'}: the frame cache needs ")
    assert "(12 frames of 128x72) but only 48.8 KiB are free; free space, or lower data.frames (12) or " \
           "data.frame_short_side (72)" in err[0]
    assert not list((tmp_path / "run" / "stage2" / "frames").iterdir())


def test_frame_cache_write_that_fails_leaves_no_temp_and_killed_temps_are_removed(tmp_path, test_videos,
                                                                                  monkeypatch, capsys):
    """A full disk during the write is an OSError naming the cache (ordinary writes, no memory map); temp files
    of a killed build (this version's and the older ``.frames.<pid>.npy.tmp``) go at the next build."""
    import errno

    import wtours.fsutil as fsutil
    from test_integrity import _FailingFile

    video = str(test_videos("long30"))
    out = tmp_path / "frames"
    real = fsutil._fdopen
    monkeypatch.setattr(fsutil, "_fdopen", lambda fd, mode, **kw: _FailingFile(
        real(fd, mode, **kw), OSError(errno.ENOSPC, "No space left on device"), ok=5000))
    with pytest.raises(OSError) as e:
        build_frame_cache([video], out, frames=12, short_side=36, mode="even", seed=0)
    assert e.value.filename == str(out / "frames.npy") and e.value.errno == errno.ENOSPC
    assert list(out.iterdir()) == []
    monkeypatch.setattr(fsutil, "_fdopen", real)
    (out / ".frames.npy.a1B2c3D4.tmp").write_bytes(b"x" * 1000)  # killed atomic write
    (out / ".frames.999999999.npy.tmp").write_bytes(b"x" * 1000)  # an older wtours' memory map, its process gone
    npy = build_frame_cache([video], out, frames=12, short_side=36, mode="even", seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["frames.json", "frames.npy", "sizes.npy"]
    assert "removed 2 temp file(s)" in capsys.readouterr().err
    arr = np.load(npy, mmap_mode="r")
    assert arr.shape == (12, 36, 64, 3) and arr.dtype == np.uint8


def _neco_init_error(tmp_path, capsys, init):
    from wtours.cli import main

    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    rc = main(["neco", "--init", str(init), "--images", str(empty), "--config", "neco/tiny",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err  # no torch warning before our line
    return err[0]


def test_a_bare_state_dict_of_a_small_vit_names_no_option_neco_lacks(tmp_path, capsys):
    """Issue 20 #7: `neco` on a bare small-ViT state dict said "pass --arch", an option neco does not have;
    the layout it suggests loads."""
    from wtours.models.weights import create_vit
    from wtours.models.weights import load_init

    sd = create_vit("vit_nano_patch8_64", num_classes=0).state_dict()
    torch.save(sd, tmp_path / "nano.pth")
    line = _neco_init_error(tmp_path, capsys, tmp_path / "nano.pth")
    assert "--arch" not in line
    assert line == (f"wtours neco: error: {tmp_path / 'nano.pth'}: --init: embedding width 128 matches no standard "
                    "ViT; save it as {'arch': <timm name>, 'state_dict': <weights>} (the layout of a backbone.pt) so "
                    "that its architecture is known")
    torch.save({"arch": "vit_nano_patch8_64", "state_dict": sd}, tmp_path / "nano_arch.pth")
    assert load_init(str(tmp_path / "nano_arch.pth")).arch == "vit_nano_patch8_64"


@pytest.mark.parametrize("kind", ["legacy_protocol4", "raw_pickle"])
def test_pickles_weights_only_cannot_read_are_one_line_naming_trust_checkpoint(tmp_path, capsys, kind):
    """Issue 20 #7: a legacy pickle showed torch's truncated advice and no hint of --trust-checkpoint; a raw
    pickle printed two torch warnings before our line."""
    import argparse
    import pickle

    path = tmp_path / f"{kind}.pth"
    if kind == "raw_pickle":
        with open(path, "wb") as f:
            pickle.dump({"a": 1}, f, protocol=4)
    else:
        torch.save({"w": torch.zeros(2), "args": argparse.Namespace(a=1)}, path,
                   _use_new_zipfile_serialization=False, pickle_protocol=4)
    line = _neco_init_error(tmp_path, capsys, path)
    assert line == (f"wtours neco: error: {path}: --init: cannot be read safely (weights_only: Unsupported operand "
                    "149); it may hold pickled Python objects that could run code when loaded: pass "
                    "--trust-checkpoint if you trust its source")
