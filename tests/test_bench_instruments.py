"""``wtours bench instruments`` shortened: tiny synthetic sets, two seeds; the pixels pseudo-encoder."""

import json

import pytest
import torch

from wtours.bench.instruments import aggregate, parse_encoders
from wtours.cli import main
from wtours.errors import UserError


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    from wtours.video.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, width=96, height=64, sequences=4, seq_frames=5, seconds=1, seed=0, progress=False)
    return out


def test_bench_instruments_short(synth_dir, tmp_path, capsys):
    out = tmp_path / "bi"
    rc = main(["bench", "instruments", "--data", str(synth_dir), "--seeds", "0", "1", "--eval-config", "eval/tiny",
               "--out", str(out), "--quiet", "--encoder", "again=random:vit_nano_patch8_64@{seed}",
               "--range-row", "oracle", "--supervised-steps", "3", "--supervised-batch", "4"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| oracle |" in printed and "range: oracle − random" in printed
    r = json.loads((out / "instruments.json").read_text())
    rows = r["aggregate"]["rows"]
    assert list(rows) == ["random", "pixels", "oracle", "again", "supervised"]
    sup = r["settings"]["rows"]["supervised"]
    assert sup["0"].endswith("seed0/train/backbone.pt") and sup["1"].endswith("seed1/train/backbone.pt")
    for k in ("F", "C", "D", "J&F", "in-context", "linear"):  # 3 steps move the weights: not random's scores
        assert 0 <= rows["supervised"][k]["mean"] <= 100
    assert r["settings"]["rows"]["random"] == {"0": "random:vit_nano_patch8_64@0", "1": "random:vit_nano_patch8_64@1"}
    for k in ("F", "C", "D", "J&F", "in-context", "linear"):
        # the same encoder spec under another name scores exactly the same: the bench is deterministic
        assert rows["again"][k]["mean"] == rows["random"][k]["mean"]
        assert all(0 <= r["per_seed"][n][s][k] <= 100 for n in rows for s in ("0", "1"))
    for k in ("C", "J&F", "in-context", "linear"):  # the ground truth at patch resolution beats a random ViT
        assert rows["oracle"][k]["mean"] > rows["random"][k]["mean"] + 5, k
    dyn = r["aggregate"]["dynamic_range"]
    assert dyn["J&F"]["points"] == pytest.approx(rows["oracle"]["J&F"]["mean"] - rows["random"]["J&F"]["mean"])
    assert (out / "instruments.md").read_text().startswith("Instrument calibration")


def test_bench_instruments_bad_arguments(tmp_path, capsys):
    with pytest.raises(UserError, match="NAME=CHECKPOINT"):
        parse_encoders(["nope"])
    with pytest.raises(UserError, match="taken"):
        parse_encoders(["random=random:vit_nano_patch8_64"])
    assert main(["bench", "instruments", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wtours synth" in err
    assert main(["bench", "instruments", "--arch", "resnet18", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    capsys.readouterr()
    assert main(["bench", "instruments", "--encoder", "supervised=random:vit_nano_patch8_64", "--out",
                 str(tmp_path / "o"), "--quiet"]) == 2
    assert "'supervised' is taken" in capsys.readouterr().err
    assert main(["bench", "instruments", "--supervised-steps", "-1", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--supervised-steps must be >= 0" in capsys.readouterr().err


def test_aggregate_separation():
    per = {"random": {0: {k: 10.0 + s for s, k in enumerate(["F", "C", "D", "J&F", "in-context", "linear"])},
                      1: {k: 12.0 + s for s, k in enumerate(["F", "C", "D", "J&F", "in-context", "linear"])}},
           "oracle": {0: {k: 20.0 for k in ["F", "C", "D", "J&F", "in-context", "linear"]},
                      1: {k: 22.0 for k in ["F", "C", "D", "J&F", "in-context", "linear"]}}}
    agg = aggregate(per, "oracle")
    f = agg["rows"]["oracle"]["F"]
    assert f["mean"] == 21.0 and f["std"] == pytest.approx(2 ** 0.5) and f["minus_random"] == 10.0
    assert f["separation"] == pytest.approx(10 / 2 ** 0.5)
    assert agg["dynamic_range"]["F"]["std_units"] == pytest.approx(10 / 2 ** 0.5)


def test_pixel_encoder_features():
    from wtours.models.weights import load_backbone

    enc, info = load_backbone("pixels:4@0.5")
    assert info["kind"] == "pixels" and enc.patch_embed.patch_size == (4, 4) and enc.embed_dim == 8
    x = torch.zeros(1, 3, 8, 12)
    x[:, 0, :4, :4] = 2.0  # a red top-left patch
    x[:, 1, 4:, 8:] = torch.tensor([[0.0, 1.0, 0.0, 1.0]] * 4)  # a textured green patch
    tok = enc.forward_features(x)
    assert tok.shape == (1, 1 + 2 * 3, 8) and torch.equal(tok[0, 0], torch.zeros(8))
    assert tok[0, 1, 0] == 2.0 and tok[0, 1, 3] == 0.0  # mean red, no texture
    assert tok[0, 6, 1] == 0.5 and tok[0, 6, 4] == pytest.approx(0.5)  # mean green 0.5, std 0.5
    assert tok[0, 1, 6:].tolist() == [-0.5, -0.5] and tok[0, 6, 6:].tolist() == [0.5, 0.5]  # position x 0.5
    assert load_backbone("pixels:8@0")[0].embed_dim == 6
    with pytest.raises(UserError, match="pixels:<patch size>"):
        load_backbone("pixels:x")
