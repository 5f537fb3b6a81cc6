"""Label propagation (wtours.eval.propagation): the batched propagation against a per-frame transcription of
DINO's label_propagation, an exactly translated feature field, the output steps, and the command end to end."""

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wtours.cli import main
from wtours.eval.propagation import input_size, neighbourhood, norm_mask, one_hot_first, propagate, to_labels

TINY = ["--config", "eval/propagation_tiny", "--device", "cpu", "--set", "progress=false"]
RANDOM = "random:vit_nano_patch8_64"


def ref_propagate(feats, first, n_last, radius, topk, temperature):
    """DINO's loop (eval_video_segmentation.py): a FIFO of (features, soft labels), full affinity matrices."""
    t_n, d, h, w = feats.shape
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * radius + 1):
                for q in range(2 * radius + 1):
                    y, x = i - radius + p, j - radius + q
                    if 0 <= y < h and 0 <= x < w:
                        mask[i, j, y, x] = 1
    mask = mask.reshape(h * w, h * w)
    f1 = feats[0].reshape(d, -1)
    que = []
    outs = [first[None]]
    for t in range(1, t_n):
        used_feats = [f1] + [a for a, _ in que]
        used_segs = [first[None]] + [b for _, b in que]
        tar = feats[t].reshape(d, -1).T  # [hw, d]
        srcs = F.normalize(torch.stack(used_feats), dim=1, p=2)  # [nc, d, hw]
        tar_n = F.normalize(tar, dim=1, p=2)[None].repeat(len(used_feats), 1, 1)
        aff = torch.exp(torch.bmm(tar_n, srcs) / temperature)  # [nc, hw tar, hw src]
        if radius > 0:
            aff = aff * mask[None]
        aff = aff.transpose(2, 1).reshape(-1, h * w)  # [nc*hw src, hw tar]
        tk_val, _ = torch.topk(aff, dim=0, k=topk)
        tk_min, _ = torch.min(tk_val, dim=0)
        aff[aff < tk_min] = 0
        aff = aff / torch.sum(aff, keepdim=True, axis=0)
        segs = torch.cat(used_segs)
        nc, c, _, _ = segs.shape
        segs = segs.reshape(nc, c, -1).transpose(2, 1).reshape(-1, c).T
        seg_tar = torch.mm(segs, aff).reshape(1, c, h, w)
        if len(que) == n_last:
            que.pop(0)
        que.append((tar.T, seg_tar))
        outs.append(seg_tar)
    return torch.cat(outs)


def test_batched_propagation_equals_dino_loop():
    torch.manual_seed(0)
    feats = torch.randn(11, 16, 5, 7)
    first = one_hot_first(torch.randint(0, 3, (5, 7)))
    for radius, topk, n_last, budget in ((2, 5, 3, 1 << 25), (0, 4, 7, 1 << 25), (1, 5, 7, 50)):
        got = propagate(feats, first, n_last, radius, topk, 0.1, budget)
        want = ref_propagate(feats, first, n_last, radius, topk, 0.1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.allclose(got.sum(1), torch.ones(11, 5, 7), atol=1e-5)  # convex combinations of one-hots


def test_translated_feature_field_moves_the_labels():
    """Frame t sees a fixed world of random patch features shifted right by t patches: the object moves with it."""
    torch.manual_seed(1)
    h, w, d, steps = 6, 10, 64, 4
    world = torch.randn(d, h, w + steps)
    feats = torch.stack([world[:, :, steps - t: steps - t + w] for t in range(steps + 1)])  # content moves right
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[1:4, 2:4] = 1
    lab[4:6, 0:2] = 2
    soft = propagate(feats, one_hot_first(lab), n_last=7, radius=3, topk=5, temperature=0.1)
    pred = soft.argmax(1)
    for t in range(1, steps + 1):
        want = torch.zeros_like(lab)
        want[:, t:] = lab[:, : w - t]
        seen = torch.zeros_like(lab, dtype=torch.bool)
        seen[:, t:] = True  # the columns that entered the view have no source: not checked
        assert torch.equal(pred[t][seen], want[seen]), t
        assert soft[t].amax(0)[seen].min() > 0.99  # one exact match dominates exp(1/0.1) vs exp(~0/0.1)


def test_input_size_is_dinos_rule_and_window_is_square():
    assert input_size(480, 854) == (480, 832)
    assert input_size(854, 480) == (832, 480)
    assert input_size(480, 910) == (480, 896)
    assert input_size(64, 96, 96, 16) == (96, 144)
    win = neighbourhood(4, 5, 1, torch.device("cpu")).reshape(4, 5, 4, 5)
    assert win[1, 1].sum() == 9 and win[0, 0].sum() == 4 and win[3, 4, 2, 3] and not win[3, 4, 1, 4]
    assert neighbourhood(3, 3, 0, torch.device("cpu")).all()


def test_norm_mask_and_upsampling():
    x = torch.tensor([[[0.2, 0.6], [0.4, 1.0]], [[0.0, 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    y = norm_mask(x.clone())
    torch.testing.assert_close(y[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(y[1], x[1])  # max 0: untouched
    assert torch.isinf(y[2]).all()  # constant positive: wins the argmax, as DINO's NaN
    soft = torch.zeros(1, 3, 2, 3)
    soft[0, 0] = 1.0
    soft[0, 0, 0, 2] = 0.2
    soft[0, 2, 0, 2] = 0.8
    lab = to_labels(soft, (4, 4), (8, 12))
    assert lab.shape == (1, 8, 12) and lab.dtype == torch.uint8
    assert lab[0, 0, 11] == 2 and lab[0, 7, 0] == 0
    lab2 = to_labels(soft, (4, 4), (16, 20))  # nearest to another size, PIL's rule
    from PIL import Image
    ref = np.asarray(Image.fromarray(lab[0].numpy()).resize((20, 16), Image.NEAREST))
    np.testing.assert_array_equal(lab2[0].numpy(), ref)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from wtours.video.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, width=96, height=64, sequences=2, seq_frames=6, seconds=1, seed=0, progress=False)
    return out


def test_propagation_command_end_to_end(synth_dir, tmp_path, capsys):
    out = tmp_path / "prop"
    rc = main(["eval", "propagation", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
               "--out", str(out), *TINY, "--set", "save_masks=true"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "J&F" in printed and "69.9" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["J&F"] <= 100 and m["J&F"] == pytest.approx((m["J"] + m["F"]) / 2)
    assert m["n_sequences"] == 2 and m["n_frames"] == 12
    assert m["settings"]["input_sizes"]["synth-000"] == [128, 192]
    assert m["settings"]["config"]["topk"] == 5 and m["encoder"]["arch"] == "vit_nano_patch8_64"
    objs = list(csv.DictReader((out / "per_object.csv").open()))
    assert len(objs) == m["n_objects"] and objs[0]["Sequence"] == "synth-000_1"
    assert float(np.mean([float(r["J-Mean"]) for r in objs])) == pytest.approx(m["J"], abs=0.01)
    rows = list(csv.DictReader((out / "per_sequence.csv").open()))
    assert [r["sequence"] for r in rows] == ["synth-000", "synth-001"]
    assert m["pictures"] == ["overlays/synth-000.png"] and (out / "overlays" / "synth-000.png").is_file()
    from PIL import Image
    masks = sorted((out / "masks" / "synth-001").glob("*.png"))
    assert len(masks) == 6
    gt0 = np.asarray(Image.open(synth_dir / "davis" / "Annotations" / "480p" / "synth-001" / "00000.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(masks[0])), gt0)  # frame 0 is the ground truth
    assert np.asarray(Image.open(masks[3])).shape == gt0.shape


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_input_is_one_line_exit_2(synth_dir, tmp_path, capsys):
    base = ["eval", "propagation", "--checkpoint", RANDOM, "--out", str(tmp_path / "o"), *TINY]
    assert main([*base, "--dataset", "davis", "--root", str(tmp_path / "nope")]) == 2
    _one_line(capsys, "nope", "not found")
    assert main(["eval", "propagation", "--dataset", "synth", "--root", str(synth_dir), "--out", str(tmp_path / "o"),
                 "--checkpoint", str(tmp_path / "missing.pt"), *TINY]) == 2
    _one_line(capsys, "missing.pt")
    assert main([*base, "--dataset", "synth", "--root", str(synth_dir), "--set", "topk=0"]) == 2
    _one_line(capsys, "topk")
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(2)
    feats = torch.randn(9, 32, 12, 20)
    first = one_hot_first(torch.randint(0, 4, (12, 20)))
    cpu = propagate(feats, first, 7, 5, 5, 0.1)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        gpu = propagate(feats.cuda(), first.cuda(), 7, 5, 5, 0.1, budget=1 << 12).cpu()
    finally:
        torch.set_float32_matmul_precision(prev)
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(gpu.sum()))


def test_an_exported_backbone_scores_as_its_random_spec(synth_dir, tmp_path):
    """backbone.pt of the weights random:<arch>@0 builds gives the same J&F, and its identity is recorded."""
    from wtours.eval.propagation import PropagationConfig, evaluate_propagation
    from wtours.models.weights import create_vit, export_backbone

    torch.manual_seed(0)
    ckpt = export_backbone(create_vit("vit_nano_patch8_64", num_classes=0, dynamic_img_size=True),
                           "vit_nano_patch8_64", tmp_path / "backbone.pt", {"stage": "test"})
    cfg = PropagationConfig(short_side=64, long_multiple=16, size_mask_neighborhood=4, overlays=0, progress=False)
    a = evaluate_propagation("synth", synth_dir, RANDOM + "@0", tmp_path / "a", cfg, device="cpu", verbose=False)
    b = evaluate_propagation(dataset="synth", root=synth_dir, checkpoint=str(ckpt), out=tmp_path / "b", cfg=cfg,
                             device="cpu", verbose=False)
    assert a["J&F"] == b["J&F"] and a["per_object"] == b["per_object"]
    assert b["encoder"]["sha256"] and a["encoder"]["sha256"] is None
    assert {k: v for k, v in b["encoder"]["meta"].items() if not k.startswith("timm_")} == {"stage": "test"}
