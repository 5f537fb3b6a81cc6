"""``wtours eval clustering`` end to end on the synthetic dataset (CPU), and its user errors."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from wtours.cli import main

TINY = ["--config", "eval/tiny", "--device", "cpu", "--set", "progress=false"]
RANDOM = "random:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from wtours.video.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, width=96, height=64, sequences=2, seq_frames=6, seconds=1, seed=0, progress=False)
    return out


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_synth_end_to_end_with_overclustering_and_repeats(synth_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
               "--out", str(out), "--k", "4", "8", "--repeats", "2", *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "TimeT" in printed and "53.7" in printed and "this run" in printed
    m = json.loads((out / "metrics.json").read_text())
    for key in ("F", "C", "D"):
        assert 0.0 < m[key] <= 100.0
        assert len(m["runs"][key]) == 2 and m[f"{key}_std"] is not None
    assert set(m["overclustering"]) == {"4", "8"}
    assert all(0 < v["miou"] <= 100 for v in m["overclustering"].values())
    assert m["n_sequences"] == 2 and m["n_frames"] == 8  # 4 evenly spaced frames of 6 per clip
    assert m["encoder"]["arch"] == "vit_tiny_patch16_224" and m["encoder"]["embed_dim"] == 192
    assert m["settings"]["config"]["frames_per_clip"] == 4 and m["settings"]["device"] == "cpu"
    assert m["timing"]["total"] > 0 and m["timing"]["frames_per_second"] > 0
    assert [r["sequence"] for r in m["per_sequence"]] == ["synth-000", "synth-001"]
    frames = json.loads((out / "frames.json").read_text())
    assert frames["sequences"]["synth-000"]["frames"] == ["00000", "00002", "00003", "00005"]
    rows = list(csv.DictReader((out / "per_sequence.csv").open()))
    assert [r["sequence"] for r in rows] == ["synth-000", "synth-001"]
    assert float(rows[0]["C"]) == pytest.approx(m["per_sequence"][0]["C"], abs=0.01)
    assert m["pictures"] == ["overlays/synth-000.png", "overlays/synth-000.gif"]
    with Image.open(out / "overlays" / "synth-000.gif") as g:
        assert g.n_frames == 4


def test_ytvos_layout_with_an_exported_backbone(synth_dir, tmp_path):
    from wtours.models.backbone_io import create_vit, export_backbone

    ckpt = export_backbone(create_vit("vit_tiny_patch16_224"), "vit_tiny_patch16_224", tmp_path / "backbone.pt",
                           {"stage": "test"})
    out = tmp_path / "yt"
    rc = main(["eval", "clustering", "--dataset", "ytvos", "--root", str(synth_dir / "ytvos"),
               "--checkpoint", str(ckpt), "--out", str(out), "--frames-per-clip", "0", *TINY, "--set", "overlays=0"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["label_kind"] == "category"
    assert m["n_frames"] == 12 and m["settings"]["config"]["frames_per_clip"] == 0
    cats = m["settings"]["categories"]
    assert cats == sorted(cats) and set(cats) <= {"person", "car", "dog", "bicycle"}
    assert set(m["D_iou_per_label"]) <= {str(i) for i in range(len(cats) + 1)}
    assert m["encoder"]["sha256"] and m["encoder"]["meta"] == {"stage": "test"}
    assert m["pictures"] == [] and not m["settings"]["split_note"].startswith("no val.txt")


def _davis_copy(synth_dir, tmp_path):
    import shutil

    root = tmp_path / "DAVIS"
    shutil.copytree(synth_dir / "davis", root)
    return root


def test_missing_layout_is_named(synth_dir, tmp_path, capsys):
    import shutil

    root = _davis_copy(synth_dir, tmp_path)
    shutil.rmtree(root / "Annotations")
    rc = main(["eval", "clustering", "--dataset", "davis", "--root", str(root), "--checkpoint", RANDOM, *TINY])
    assert rc == 2
    _one_error_line(capsys, "Annotations/480p")


def test_empty_video_list(synth_dir, tmp_path, capsys):
    lst = tmp_path / "videos.txt"
    lst.write_text("\n")
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
               "--videos", str(lst), *TINY])
    assert rc == 2
    _one_error_line(capsys, "empty", "videos.txt")


def test_checkpoint_whose_arch_does_not_match_its_weights(synth_dir, tmp_path, capsys):
    from wtours.models.backbone_io import create_vit

    sd = create_vit("vit_tiny_patch16_224").state_dict()
    bad = tmp_path / "bad.pt"
    torch.save({"arch": "vit_small_patch16_224", "state_dict": sd, "meta": {}}, bad)
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", str(bad),
               "--out", str(tmp_path / "o"), *TINY])
    assert rc == 2
    _one_error_line(capsys, "do not match", "bad.pt")
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_mask_with_unexpected_ids(synth_dir, tmp_path, capsys):
    root = _davis_copy(synth_dir, tmp_path)
    png = sorted((root / "Annotations" / "480p" / "synth-001").glob("*.png"))[0]
    with Image.open(png) as im:
        pal = im.getpalette()
        arr = np.array(im)
    arr[0, 0] = 99
    im2 = Image.fromarray(arr, "P")
    im2.putpalette(pal)
    im2.save(png)
    rc = main(["eval", "clustering", "--dataset", "davis", "--root", str(root), "--checkpoint", RANDOM,
               "--out", str(tmp_path / "o"), *TINY])
    assert rc == 2
    _one_error_line(capsys, "unexpected ids [99]", png.name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu(synth_dir, capsys):
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
               "--config", "eval/tiny", "--device", "cuda"])
    assert rc == 2
    _one_error_line(capsys, "no CUDA device")


def test_bad_config_key_is_one_line(synth_dir, capsys):
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
               *TINY, "--set", "kmeans_iters=3"])
    assert rc == 2
    _one_error_line(capsys, "kmeans_iters")


def test_bare_timm_state_dict_with_inferred_arch(synth_dir, tmp_path):
    from wtours.models.backbone_io import create_vit

    sd = create_vit("vit_tiny_patch16_224").state_dict()  # like a released DINO .pth: timm key names
    path = tmp_path / "weights.pth"
    torch.save(sd, path)
    out = tmp_path / "o"
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", str(path),
               "--out", str(out), "--frames-per-clip", "2", *TINY, "--set", "overlays=0"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["encoder"]["arch"] == "vit_tiny_patch16_224" and m["encoder"]["kind"] == "checkpoint"
    assert m["n_frames"] == 4
