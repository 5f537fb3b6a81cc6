"""Issue 18 (NeCo): references without replacement (one counter per queue), the teacher head's init, DINO's
position-embedding interpolation, and the presets' reference-parity defaults."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wtours.objectives.neco import NeCoLoss, crop_pairs, sample_distinct
from wtours.stages.neco.run import load_neco_config


def test_sample_distinct_never_repeats_and_is_uniform():
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor([49, 50, 64, 8192] * 500)
    idx = sample_distinct(g, pool, 49)
    assert idx.shape == (2000, 49)
    assert (idx >= 0).all() and (idx < pool[:, None]).all()
    assert all(len(set(r)) == 49 for r in idx.tolist())  # no duplicate in any set
    # pool == n: every set is the whole pool
    assert all(sorted(r) == list(range(49)) for r in idx[::4].tolist())
    # uniform over the pool: each of 64 slots appears in ~49/64 of the sets
    freq = torch.bincount(idx[2::4].flatten(), minlength=64).float() / 500
    assert ((freq - 49 / 64).abs() < 0.1).all()


def _queue_loss(c=16, roi=7, length=256, b=4):
    fn = NeCoLoss(dim=c, roi=roi, queue_length=length, queue_push_per_image=10, seed=0)
    # distinct unit vectors, so equal references mean the same slot drawn twice
    maps = F.normalize(torch.randn(b, 2, c, 8, 8, generator=torch.Generator().manual_seed(1)), dim=2)
    return fn, maps


def test_a_set_of_queue_references_never_holds_a_duplicate():
    """The reference draws with replacement (~13 % of its 49-reference sets hold a duplicate); ours never."""
    c, n = 16, 49
    fn, _ = _queue_loss(c=c)
    pair_g = crop_pairs(2, 6)[0]
    for step in range(6):  # a part-filled queue and a full one (256 slots)
        # fresh distinct vectors every step: equal references can only come from one slot drawn twice
        fn.push(F.normalize(torch.randn(4, 2, c, 8, 8, generator=torch.Generator().manual_seed(step)), dim=2))
        assert fn.filled[0] >= n and fn.filled[0] == fn.filled[1]  # one counter per queue, same pushes
        refs = fn.draw_references(torch.zeros(4, len(pair_g), n, c), pair_g)  # [B, P, n, C]
        sets = refs.reshape(-1, n, c)
        gram = sets @ sets.transpose(1, 2)
        off = gram - torch.eye(n) * 2  # the diagonal out of the way
        assert float(off.max()) < 0.999, f"step {step}: a set holds the same queue vector twice"
        assert bool((refs.norm(dim=-1) > 0.99).all())  # never an empty slot


def test_first_push_holds_a_whole_set_even_for_a_small_batch():
    fn, maps = _queue_loss(b=1)  # 10 per image x 1 image < 49
    fn.push(maps)
    assert fn.filled == [49, 49]
    refs = fn.draw_references(torch.zeros(1, 10, 49, 16), crop_pairs(2, 6)[0])
    assert refs.shape == (1, 10, 49, 16)


def test_in_batch_references_are_a_permutation_of_the_batchs_teacher_patches():
    fn = NeCoLoss(dim=8, roi=3, references="batch", seed=0)
    t = F.normalize(torch.randn(5, 10, 9, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    refs = fn.draw_references(t, crop_pairs(2, 6)[0])
    for p in range(10):
        got = refs[:, p].reshape(-1, 8)
        want = t[:, p].reshape(-1, 8)
        gram = got @ want.T
        assert torch.equal((gram > 0.9999).sum(1), torch.ones(45, dtype=torch.long))  # each exactly once
        assert torch.equal((gram > 0.9999).sum(0), torch.ones(45, dtype=torch.long))


@pytest.mark.parametrize("mode", ["independent", "copy"])
def test_teacher_head_init(mode):
    from wtours.models.weights import load_init
    from wtours.stages.neco.module import NeCoModule

    cfg = load_neco_config("neco/tiny", [f"model.teacher_head={mode}"])
    w = load_init("random:vit_nano_patch8_64")
    m = NeCoModule(cfg, w.arch, w.state_dict, steps_per_epoch=10)
    s, t = m.student.state_dict(), m.teacher.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s if k.startswith("vit."))  # the same backbone either way
    heads = [k for k in s if k.startswith("head.") and k.endswith("weight")]
    same = [torch.equal(s[k], t[k]) for k in heads]
    assert all(same) if mode == "copy" else not any(same)
    if mode == "independent":  # the same init law (trunc-normal std .02), its own draw, reproducible
        k = heads[0]
        assert abs(float(t[k].std()) - 0.02) < 0.003
        m2 = NeCoModule(cfg, w.arch, w.state_dict, steps_per_epoch=10)
        assert torch.equal(m2.teacher.state_dict()[k], t[k])


def test_pos_interp_dino_resamples_position_embeddings_as_dino():
    from wtours.models.weights import load_init
    from wtours.models.vit import dino_resample_pos_embed
    from wtours.stages.neco.module import NeCoNet

    w = load_init("random:vit_nano_patch8_64")
    out = {}
    for mode in ("timm", "dino"):
        cfg = load_neco_config("neco/tiny", [f"model.pos_interp={mode}"])
        net = NeCoNet(w.arch, cfg, 0.0, w.state_dict)
        x = torch.zeros(1, 4, 4, net.vit.embed_dim)  # a 4 x 4 patch grid (a 32 px local crop), no content
        out[mode] = net.vit._pos_embed(x)
    pos = w.state_dict["pos_embed"]
    want = dino_resample_pos_embed(pos, (4, 4), (8, 8), 1)
    cls = w.state_dict["cls_token"]
    assert torch.allclose(out["dino"][:, 1:], want[:, 1:], atol=1e-6)
    assert torch.allclose(out["dino"][:, 0], (cls + pos[:, :1])[:, 0], atol=1e-6)
    assert not torch.allclose(out["timm"][:, 1:], want[:, 1:], atol=1e-3)  # timm's resampling differs


def test_neco_presets_default_to_the_reference():
    c = load_neco_config("neco/neco_vits16", [])
    assert c.model.teacher_head == "independent" and c.loss.references == "queue" and c.model.pos_interp == "timm"
    d = load_neco_config("neco/neco_dino_vits16", [])
    assert (d.loss.references, d.data.batch_size, d.trainer.epochs) == ("batch", 45, 50)
    assert d.model.teacher_head == "independent" and d.model.pos_interp == "dino" and d.crops.local_size == 96
    p = load_neco_config("neco/proof", [])  # ours: measured better at CPU scale on the dense instruments (issue 18)
    assert (p.loss.references, p.model.teacher_head, p.model.pos_interp) == ("queue", "copy", "timm")
