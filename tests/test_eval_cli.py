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
    from wtours.models.weights import create_vit, export_backbone

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
    assert m["encoder"]["sha256"] and {k: v for k, v in m["encoder"]["meta"].items() if not k.startswith("timm_")} == {"stage": "test"}
    assert m["encoder"]["meta"]["timm_base"]  # exports name the timm model that loads them
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
    from wtours.models.weights import create_vit

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
    from wtours.models.weights import create_vit

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


def _no_features(monkeypatch):
    import wtours.eval.cli as ecli

    def boom(*a, **k):
        raise AssertionError("features were extracted")

    monkeypatch.setattr(ecli, "extract_features", boom)


@pytest.mark.parametrize("k", ["4000", "100000"])
def test_k_above_the_points_is_refused_before_features(k, synth_dir, tmp_path, capsys, monkeypatch):
    # tiny preset: 8 frames x 16x24 pixels at eval_size_dataset = 3072 points; --k 100000 used to hang
    _no_features(monkeypatch)
    out = tmp_path / "o"
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
               "--out", str(out), "--k", "8", k, *TINY])
    assert rc == 2
    _one_error_line(capsys, f"--k {k} (overcluster_k): more clusters than the 3072 points",
                    "8 frames x 16x24 pixels at eval_size_dataset", "at most 3072")
    assert not (out / "metrics.json").exists()
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
               "--out", str(out), *TINY, "--set", "cluster_at=patch", "--set", "overcluster_k=[193]"])
    assert rc == 2  # patch tokens: 8 frames x 4x6
    _one_error_line(capsys, "--k 193 (overcluster_k)", "192 points", "4x6 patch tokens")


@pytest.mark.parametrize("args,needle", [
    (["--frames-per-clip", "-1"], "--frames-per-clip -1: must be >= 0"),
    (["--set", "frames_per_clip=-1"], "frames_per_clip must be >= 0"),
    (["--repeats", "0"], "--repeats 0: must be >= 1"),
    (["--set", "repeats=0"], "repeats must be >= 1, got 0"),
    (["--k", "5", "0"], "--k 0: K must be >= 1"),
    (["--set", "overlays=-1"], "overlays must be >= 0"),
    (["--set", "missing_annotations=maybe"], "missing_annotations: 'maybe' is not one of 'error', 'skip'"),
])
def test_bad_numbers_are_one_line(args, needle, synth_dir, tmp_path, capsys, monkeypatch):
    _no_features(monkeypatch)
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
               "--out", str(tmp_path / "o"), *TINY, *args])
    assert rc == 2
    _one_error_line(capsys, needle)


def test_missing_annotation_png_is_an_error_or_a_counted_skip(synth_dir, tmp_path, capsys):
    root = _davis_copy(synth_dir, tmp_path)
    png = root / "Annotations" / "480p" / "synth-001" / "00003.png"
    png.unlink()
    base = ["eval", "clustering", "--dataset", "davis", "--root", str(root), "--checkpoint", RANDOM, *TINY,
            "--set", "overlays=0", "--frames-per-clip", "0"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    _one_error_line(capsys, str(png), "missing annotation", "00003.jpg", "missing_annotations=skip")
    assert main([*base, "--out", str(tmp_path / "b"), "--set", "missing_annotations=skip"]) == 0
    assert "note: skipped 1 frame(s) or annotation(s) without their pair in 1 video(s)" in capsys.readouterr().out
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["n_frames"] == 11 and m["settings"]["skipped_unpaired"] == {"synth-001": 1}


def test_video_list_edge_cases(synth_dir, tmp_path, capsys, monkeypatch):
    import os

    _no_features(monkeypatch)
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)  # nobody writes: reading it would block
    files = {"unknown.txt": "synth-000\nnosuch\nnope\n", "dup.txt": "synth-000\nsynth-000\n", "path.txt": "../x\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases = [
        (tmp_path / "none.txt", ["none.txt", "video list not found"]),
        (tmp_path, ["is a directory, not a video list"]),
        (fifo, ["not a regular file (a FIFO)"]),
        (tmp_path / "unknown.txt", ["2 of 3 listed videos are not in the dataset", "'nosuch'"]),
        (tmp_path / "dup.txt", ["line 2: video 'synth-000' is listed twice"]),
        (tmp_path / "path.txt", ["'../x' is not a video name"]),
    ]
    for lst, needles in cases:
        rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
                   "--out", str(tmp_path / "o"), "--videos", str(lst), *TINY])
        assert rc == 2, lst
        _one_error_line(capsys, *needles)
    (tmp_path / "yt.txt").write_text("nosuch\n")
    rc = main(["eval", "clustering", "--dataset", "ytvos", "--root", str(synth_dir / "ytvos"), "--checkpoint",
               RANDOM, "--out", str(tmp_path / "o"), "--videos", str(tmp_path / "yt.txt"), *TINY])
    assert rc == 2
    _one_error_line(capsys, "meta.json", "1 of 1 listed videos are not in meta.json", "'nosuch'")


def test_root_that_is_not_a_dataset(synth_dir, tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    (tmp_path / "empty").mkdir()
    for kind, root, needle in [("davis", afile, "dataset root is not a folder"),
                               ("davis", tmp_path / "empty", "JPEGImages/480p"),
                               ("ytvos", tmp_path / "empty", "train"),
                               ("synth", tmp_path / "empty", "davis/"),
                               ("davis", synth_dir, "JPEGImages/480p")]:  # the synth folder is not DAVIS itself
        rc = main(["eval", "clustering", "--dataset", kind, "--root", str(root), "--checkpoint", RANDOM,
                   "--out", str(tmp_path / "o"), *TINY])
        assert rc == 2
        _one_error_line(capsys, needle)


@pytest.mark.parametrize("device,needle", [("mps", "expected cuda, cuda:N, cpu or auto"),
                                           ("meta", "expected cuda, cuda:N, cpu or auto"),
                                           ("cuda:1", "--device cuda:1")])
def test_unusable_devices_are_one_line(device, needle, synth_dir, tmp_path, capsys):
    if device == "cuda:1" and torch.cuda.device_count() > 1:
        pytest.skip("this machine has a cuda:1")
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
               "--out", str(tmp_path / "o"), "--config", "eval/tiny", "--device", device])
    assert rc == 2
    _one_error_line(capsys, needle)


def test_a_training_checkpoint_is_evaluated_teacher_first(synth_dir, tmp_path, capsys):
    """Issue 12: `--checkpoint runs/x/stage1/last.ckpt` evaluates its teacher (said, and recorded), and
    `last.ckpt:student` its student; the file's sha256 is recorded either way."""
    import hashlib

    from wtours.config import load_config
    from wtours.fsutil import torch_save
    from wtours.integrity import seal
    from wtours.stages.video.config import VideoPretrainConfig
    from wtours.stages.video.module import VideoModule

    m = VideoModule(load_config(VideoPretrainConfig, "video/tiny"))
    with torch.no_grad():
        for p in m.teacher.parameters():
            p.mul_(0.5)  # a teacher far from the student
    ckpt = {"epoch": 0, "global_step": 5, "state_dict": m.state_dict()}
    m.on_save_checkpoint(ckpt)
    path = torch_save(seal(ckpt), tmp_path / "stage1" / "last.ckpt")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    scores = {}
    for spec, role in ((str(path), "teacher"), (f"{path}:student", "student")):
        out = tmp_path / role
        rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", spec,
                   "--out", str(out), *TINY, "--set", "overlays=0"])
        assert rc == 0
        printed = capsys.readouterr().out
        assert f"is a training checkpoint (step 5): evaluating its {role}" in printed
        enc = json.loads((out / "metrics.json").read_text())["encoder"]
        assert enc["role"] == role and enc["spec"] == spec and enc["sha256"] == digest
        assert enc["arch"] == "vit_tiny_patch16_224" and enc["verified"] is True
        assert enc["meta"]["checkpoint"]["global_step"] == 5
        scores[role] = json.loads((out / "metrics.json").read_text())["F"]
    assert scores["teacher"] != scores["student"]  # two different encoders were evaluated


def test_timet_parity_config_sets_the_reference_choices_and_records_them(synth_dir, tmp_path):
    """configs/eval/timet_parity.yaml: random sorted frames redrawn per repeat (± over draws), scaler + PCA and
    score averages per batch of 16 videos, the DAVIS-2017 Unsupervised masks; metrics.json records them."""
    import shutil

    from wtours.config import load_config
    from wtours.eval.config import EvalConfig

    cfg = load_config(EvalConfig, "eval/timet_parity")
    assert (cfg.frame_sampling, cfg.frames_per_clip, cfg.pca_scope, cfg.batch_videos, cfg.score_average,
            cfg.davis_annotations) == ("random", 4, "batch", 16, "batch", "Annotations_unsupervised")
    assert cfg.repeats > 1 and (cfg.input_size, cfg.eval_size, cfg.eval_size_dataset) == ([224, 224],) * 2 + ([112, 112],)
    root = tmp_path / "synth"
    shutil.copytree(synth_dir / "davis", root / "davis")
    shutil.copytree(root / "davis" / "Annotations", root / "davis" / "Annotations_unsupervised")
    small = ["--set", "input_size=[64,96]", "--set", "eval_size=[32,48]", "--set", "eval_size_dataset=[16,24]",
             "--set", "niter=10", "--set", "restarts=2", "--set", "workers=2", "--set", "overlays=0",
             "--set", "progress=false", "--set", "repeats=3"]
    out = tmp_path / "parity"
    assert main(["eval", "clustering", "--dataset", "synth", "--root", str(root), "--checkpoint", RANDOM,
                 "--out", str(out), "--device", "cpu", "--config", "eval/timet_parity", *small]) == 0
    m = json.loads((out / "metrics.json").read_text())
    s = m["settings"]
    assert s["annotations"] == "Annotations_unsupervised/480p"
    assert s["frames"] == "4 random sorted annotated frames per clip, 3 draws (seeds 1..3)"
    assert any("per batch of 16 videos (as the reference)" in n for n in s["notes"])
    assert len(m["runs"]["F"]) == 3 and m["F_std"] is not None
    frames = json.loads((out / "frames.json").read_text())
    assert frames["frame_sampling"] == "random" and [d["seed"] for d in frames["draws"]] == [1, 2, 3]
    draws = [tuple(map(tuple, d["sequences"].values())) for d in frames["draws"]]
    assert len(set(draws)) > 1  # frames redrawn per repeat
    assert all(len(f) == 4 and list(f) == sorted(f) for d in draws for f in d)
    # the default records its annotation set too
    out2 = tmp_path / "default"
    assert main(["eval", "clustering", "--dataset", "synth", "--root", str(root), "--checkpoint", RANDOM,
                 "--out", str(out2), *TINY, "--set", "overlays=0"]) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["settings"]["annotations"] == "Annotations/480p"
    assert m2["settings"]["frames"] == "4 evenly spaced annotated frames per clip"


@pytest.mark.parametrize("key, scale, problem", [
    ("qkv.weight", 1e27, "feature values are not finite"),
    ("qkv.weight", float("inf"), "feature values are not finite"),
    ("norm.weight", 1e6, "past the sane bound 100000"),  # finite features of ~1e6
])
def test_diverged_weights_are_refused_with_one_line_naming_the_checkpoint(synth_dir, tmp_path, capsys, key, scale,
                                                                          problem):
    """Issue 20 #2: finite weights of 5e27 (and non-finite ones, in a file not written by wtours) gave
    `RuntimeError: probability tensor contains either inf, nan or element < 0` in kmeans_pp."""
    from wtours.models.weights import create_vit

    vit = create_vit("vit_tiny_patch16_224")
    sd = {k: v * scale if k.endswith(key) else v for k, v in vit.state_dict().items()}
    ckpt = tmp_path / "exploded.pth"
    torch.save(sd, ckpt)  # a plain timm state dict
    rc = main(["eval", "clustering", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", str(ckpt),
               "--out", str(tmp_path / "ev"), *TINY])
    assert rc == 2
    _one_error_line(capsys, f"wtours eval: error: {ckpt}: ", problem,
                    "the weights diverged; evaluate an earlier checkpoint")
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_an_error_during_feature_extraction_starts_on_its_own_line_not_the_bars(synth_dir, tmp_path, capsys):
    """Issue 20 #7: eval errors were printed on the progress bar's line."""
    root = _davis_copy(synth_dir, tmp_path)
    jpg = sorted((root / "JPEGImages" / "480p" / "synth-001").glob("*.jpg"))[1]
    jpg.write_bytes(b"not a jpeg")
    rc = main(["eval", "clustering", "--dataset", "davis", "--root", str(root), "--checkpoint", RANDOM,
               "--out", str(tmp_path / "o"), "--config", "eval/tiny", "--device", "cpu", "--set", "progress=true",
               "--set", "batch_size=2", "--frames-per-clip", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "features:" in err  # the bar was shown
    last = err.rstrip("\n").split("\n")[-1].split("\r")[-1]  # what a terminal shows on the error's line
    assert last.startswith("wtours eval: error: ") and jpg.name in last, repr(err[-300:])
