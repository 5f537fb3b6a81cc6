"""In-context retrieval (wtours.eval.incontext): exact chunked k-NN vote against brute force, patch histograms,
rare-first memory sampling, an oracle feature field, the splits, and the command end to end with its errors."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wtours.cli import main
from wtours.errors import UserError
from wtours.eval.common import confusion_matrix, miou_from_confusion
from wtours.eval.incontext import build_memory, knn_vote, patch_histograms, retrieve, sample_memory

TINY = ["--config", "eval/incontext_tiny", "--device", "cpu", "--set", "progress=false"]
RANDOM = "random:vit_nano_patch8_64"


def brute_vote(q, keys, values, k, temperature):
    sims = q @ keys.T
    v, i = sims.sort(dim=1, descending=True)
    w = torch.softmax(v[:, :k] / temperature, dim=1)
    return torch.einsum("rk,rkc->rc", w, values[i[:, :k]])


def test_chunked_vote_equals_brute_force():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(37, 12), dim=1)
    keys = F.normalize(torch.randn(301, 12), dim=1)
    values = torch.rand(301, 5)
    for k, budget in ((1, 1 << 20), (30, 1 << 20), (30, 64), (7, 1000)):
        torch.testing.assert_close(knn_vote(q, keys, values, k, 0.02, budget), brute_vote(q, keys, values, k, 0.02),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="k=302"):
        knn_vote(q, keys, values, 302, 0.02, 1 << 20)


def test_patch_histograms_count_ignore_as_background():
    lab = torch.zeros(1, 4, 4, dtype=torch.uint8)
    lab[0, 0, 0] = 2
    lab[0, 0, 1] = 255
    lab[0, 2:, 2:] = 1
    h = patch_histograms(lab, 3, (2, 2))
    assert h.shape == (1, 3, 2, 2)
    torch.testing.assert_close(h.sum(1), torch.ones(1, 2, 2))
    torch.testing.assert_close(h[0, :, 0, 0], torch.tensor([0.75, 0.0, 0.25]))
    torch.testing.assert_close(h[0, :, 1, 1], torch.tensor([0.0, 1.0, 0.0]))


def test_rare_first_sampling_prefers_rare_classes():
    n, side = 200, 4
    hist = torch.zeros(n, 2, side, side)
    hist[:, 0] = 1.0
    rare = torch.randint(0, side * side, (n,))
    hist[torch.arange(n), 0, rare // side, rare % side] = 0.0
    hist[torch.arange(n), 1, rare // side, rare % side] = 1.0
    gen = torch.Generator().manual_seed(0)
    picked = sample_memory(hist, 4, "rare_first", gen)
    hit_rare = (picked == rare[:, None]).any(1).float().mean()
    picked_u = sample_memory(hist, 4, "uniform", torch.Generator().manual_seed(0))
    hit_uniform = (picked_u == rare[:, None]).any(1).float().mean()
    assert picked.shape == (n, 4) and hit_rare > 0.9 and hit_uniform < 0.45
    assert all(len(set(r.tolist())) == 4 for r in picked)  # distinct patches


def test_oracle_features_give_100_and_memory_size_is_honoured():
    """Features that encode each patch's class retrieve the labels exactly: mIoU 100 (stripes of patch rows, so
    that the bilinear upsampling's boundary falls on the patch border, as the ground truth's)."""
    torch.manual_seed(0)
    n, p, h, w, c = 6, 4, 5, 7, 4
    cls = torch.stack([torch.randperm(c)[torch.arange(h) % c] for _ in range(n)])[:, :, None].expand(n, h, w)
    labels = cls.repeat_interleave(p, 1).repeat_interleave(p, 2).to(torch.uint8)  # [N, 20, 28], pure patches
    emb = torch.randn(c, 16)
    grid = emb[cls].permute(0, 3, 1, 2) + 0.01 * torch.randn(n, 16, h, w)
    mem = build_memory(grid[:3], labels[:3], c, (p, p))
    assert mem.keys.shape == (3 * h * w, 16) and mem.values.shape == (3 * h * w, c)
    pred = retrieve(mem, grid[3:], (h * p, w * p), k=5, temperature=0.02, budget=1 << 20)
    conf = confusion_matrix(pred, labels[3:], c).numpy()
    assert miou_from_confusion(conf)[0] == 1.0
    small = build_memory(grid[:3], labels[:3], c, (p, p), memory_size=30, seed=1)
    assert small.keys.shape[0] == 30  # 10 per frame
    with pytest.raises(UserError, match="memory_size 2"):
        build_memory(grid[:3], labels[:3], c, (p, p), memory_size=2)


def test_miou_over_all_or_present_classes():
    conf = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    m_all, iou = miou_from_confusion(conf, "all")
    m_pres, _ = miou_from_confusion(conf, "present")
    assert iou[0] == pytest.approx(8 / 11) and iou[1] == pytest.approx(3 / 6) and np.isnan(iou[2])
    assert m_all == pytest.approx((8 / 11 + 0.5) / 3) and m_pres == pytest.approx((8 / 11 + 0.5) / 2)
    gt = torch.tensor([[0, 1, 255]])
    assert confusion_matrix(torch.tensor([[1, 1, 0]]), gt, 2).tolist() == [[0, 1], [0, 1]]


@pytest.fixture(scope="module")
def synth_dirs(tmp_path_factory):
    from wtours.video.synth import synthesize

    a = tmp_path_factory.mktemp("synth_a")
    b = tmp_path_factory.mktemp("synth_b")
    synthesize(a, width=96, height=64, sequences=4, seq_frames=4, seconds=1, seed=0, progress=False)
    synthesize(b, width=96, height=64, sequences=2, seq_frames=4, seconds=1, seed=5, progress=False)
    return a, b


def test_incontext_command_end_to_end(synth_dirs, tmp_path, capsys):
    a, b = synth_dirs
    out = tmp_path / "inc"
    assert main(["eval", "incontext", "--dataset", "synth", "--root", str(a), "--checkpoint", RANDOM,
                 "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "in-context mIoU" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["mIoU"] <= 100 and m["n_classes"] == 5
    assert m["split"]["rule"].startswith("alternate") and len(m["split"]["train_videos"]) == 2
    assert not set(m["split"]["train_videos"]) & set(m["split"]["held_videos"])
    assert m["n_memory_frames"] == 8 and m["n_query_frames"] == 8 and m["memory_patches"] == 8 * 8 * 14
    assert m["memory_bytes"] == m["memory_patches"] * (128 + 5) * 4
    assert m["settings"]["config"]["k"] == 30 and m["settings"]["config"]["temperature"] == 0.02
    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["name"] for r in rows] == ["background", "bicycle", "car", "dog", "person"]
    ious = [float(r["IoU"]) for r in rows if r["IoU"]]
    assert m["mIoU"] == pytest.approx(sum(ious) / 5, abs=0.05)
    assert (out / m["pictures"][0]).is_file()
    # a separate memory set: every video of b is memory, every held-out video of a is a query
    out2 = tmp_path / "inc2"
    assert main(["eval", "incontext", "--dataset", "synth", "--root", str(a), "--memory-root", str(b / "ytvos"),
                 "--checkpoint", RANDOM, "--out", str(out2), *TINY, "--set", "overlays=0"]) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["split"]["rule"].startswith("memory_root") and m2["n_memory_frames"] == 8 and m2["n_query_frames"] == 16


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_incontext_bad_input(synth_dirs, tmp_path, capsys):
    a, _ = synth_dirs
    base = ["eval", "incontext", "--checkpoint", RANDOM, "--out", str(tmp_path / "o"), *TINY]
    assert main([*base, "--dataset", "synth", "--root", str(a), "--set", "k=100000"]) == 2
    _one_line(capsys, "k=100000", "memory holds only")
    assert main([*base, "--dataset", "ytvos", "--root", str(tmp_path / "none")]) == 2
    _one_line(capsys, "none", "not found")
    assert main([*base, "--dataset", "synth", "--root", str(a / "davis")]) == 2
    _one_line(capsys, "ytvos")
    assert main([*base, "--dataset", "synth", "--root", str(a), "--set", "input_size=[60,112]"]) == 2
    _one_line(capsys, "input_size", "patch size 8")
    assert main(["eval", "incontext", "--dataset", "synth", "--root", str(a), "--out", str(tmp_path / "o"),
                 "--checkpoint", "random:not_a_vit", *TINY]) == 2
    capsys.readouterr()
    assert not (tmp_path / "o" / "metrics.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_vote_on_cuda_matches_cpu():
    torch.manual_seed(1)
    q = F.normalize(torch.randn(500, 64), dim=1)
    keys = F.normalize(torch.randn(5000, 64), dim=1)
    values = torch.rand(5000, 7)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        gpu = knn_vote(q.cuda(), keys.cuda(), values.cuda(), 30, 0.02, 1 << 16).cpu()
    finally:
        torch.set_float32_matmul_precision(prev)
    torch.testing.assert_close(gpu, knn_vote(q, keys, values, 30, 0.02, 1 << 16), rtol=1e-4, atol=1e-5)
