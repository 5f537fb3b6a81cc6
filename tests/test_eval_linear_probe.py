"""Linear segmentation probe (wtours.eval.linear_probe): the head's order of operations, determinism, an oracle
feature field, and the command end to end with its errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from wtours.cli import main
from wtours.eval.common import confusion_matrix, miou_from_confusion
from wtours.eval.linear_probe import LinearConfig, predict_probe, train_probe

TINY = ["--config", "eval/linear_tiny", "--device", "cpu", "--set", "progress=false"]
RANDOM = "random:vit_nano_patch8_64"


def stripes(n=8, h=4, w=6, p=4, c=3, d=8, noise=0.3, seed=0, emb=None):
    """Patch rows of random classes; features = the class's embedding + noise."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.stack([torch.randperm(c, generator=g)[torch.arange(h) % c] for _ in range(n)])[:, :, None].expand(n, h, w)
    labels = cls.repeat_interleave(p, 1).repeat_interleave(p, 2).to(torch.uint8)
    emb = torch.randn(c, d, generator=torch.Generator().manual_seed(99)) if emb is None else emb
    grid = emb[cls].permute(0, 3, 1, 2) + noise * torch.randn(n, d, h, w, generator=g)
    return grid, labels


def test_conv_then_upsample_equals_upsample_then_conv():
    torch.manual_seed(0)
    head = torch.nn.Conv2d(8, 5, 1)
    x = torch.randn(3, 8, 4, 6)
    a = F.interpolate(head(x), size=(17, 23), mode="bilinear", align_corners=False)
    b = head(F.interpolate(x, size=(17, 23), mode="bilinear", align_corners=False))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_probe_is_deterministic_and_learns_a_separable_field():
    grid, labels = stripes()
    labels[0, :2, :2] = 255  # ignored pixels
    cfg = LinearConfig(epochs=30, lr_drop_epochs=[25], train_batch=4, lr=0.5, seed=3)
    h1, l1 = train_probe(grid, labels, 3, cfg)
    h2, l2 = train_probe(grid, labels, 3, cfg)
    assert l1 == l2 and torch.equal(h1.weight, h2.weight) and torch.equal(h1.bias, h2.bias)
    h3, _ = train_probe(grid, labels, 3, LinearConfig(epochs=30, lr_drop_epochs=[25], train_batch=4, lr=0.5, seed=4))
    assert not torch.equal(h1.weight, h3.weight)
    assert len(l1) == 30 and l1[-1] < 0.2 * l1[0]
    # a held-out field of the same classes (other stripes, other noise): segmented almost perfectly (the bilinear
    # crossing of two rows' logits need not fall exactly on the patch border)
    vg, vl = stripes(seed=1)
    conf = confusion_matrix(predict_probe(h1, vg, tuple(vl.shape[-2:])), vl, 3).numpy()
    assert miou_from_confusion(conf)[0] > 0.95
    # features without the class signal: no better than chance
    noise, _ = stripes(seed=2, noise=1.0, emb=torch.zeros(3, 8))
    hn, _ = train_probe(noise, labels, 3, cfg)
    conf = confusion_matrix(predict_probe(hn, vg, tuple(vl.shape[-2:])), vl, 3).numpy()
    assert miou_from_confusion(conf)[0] < 0.5
    assert torch.randn(1).shape == (1,)  # the global RNG was left usable


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from wtours.video.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, width=96, height=64, sequences=4, seq_frames=4, seconds=1, seed=0, progress=False)
    return out


def test_linear_command_end_to_end_and_reproducible(synth_dir, tmp_path, capsys):
    runs = []
    for i in range(2):
        out = tmp_path / f"lin{i}"
        assert main(["eval", "linear", "--dataset", "synth", "--root", str(synth_dir), "--checkpoint", RANDOM,
                     "--out", str(out), *TINY, "--set", "epochs=20", "--set", "lr_drop_epochs=[15]"]) == 0
        runs.append(json.loads((out / "metrics.json").read_text()))
    assert "linear probe mIoU" in capsys.readouterr().out
    m = runs[0]
    assert 0 <= m["mIoU"] <= 100 and m["n_classes"] == 5 and len(m["train_loss"]) == 20
    assert m["train_loss"][-1] < m["train_loss"][0]
    assert m["n_train_frames"] == 8 and m["n_val_frames"] == 8 and m["steps"] == 20
    assert m["split"]["rule"].startswith("alternate")
    assert runs[1]["mIoU"] == m["mIoU"] and runs[1]["train_loss"] == m["train_loss"]
    assert m["settings"]["config"]["lr"] == 0.1 and (tmp_path / "lin0" / "per_class.csv").is_file()


def test_linear_bad_input(synth_dir, tmp_path, capsys):
    base = ["eval", "linear", "--checkpoint", RANDOM, "--out", str(tmp_path / "o"), *TINY]
    assert main([*base, "--dataset", "synth", "--root", str(synth_dir), "--set", "epochs=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "epochs" in err
    assert main([*base, "--dataset", "synth", "--root", str(synth_dir), "--videos", str(tmp_path / "v.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "v.txt" in err
    assert not (tmp_path / "o" / "metrics.json").exists()
