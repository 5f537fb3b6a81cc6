"""F / C / D protocols (wtours.eval.protocol) on hand-made feature sets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wtours.eval.config import EvalConfig
from wtours.eval.features import FeatureSet
from wtours.eval.protocol import (
    Pools,
    assign_confusion,
    bilinear_points,
    reduce_grid,
    run_protocol,
    standardize_pca,
)


def _gt_dataset(seed=0, n_seq=3, t=3, h=8, w=10):
    """GT maps with instance ids 0..3 that differ per frame and per sequence (label 1 always present)."""
    rng = np.random.default_rng(seed)
    gts = []
    for s in range(n_seq):
        for _ in range(t):
            m = np.zeros((h, w), np.uint8)
            m[1:4, 1:5] = 1
            if rng.random() < 0.7:
                m[5:8, 2:6] = 2
            if s % 2:
                m[0:3, 6:10] = 3
            m[7, 9] = 255  # a void pixel
            gts.append(m)
    gt = torch.as_tensor(np.stack(gts))
    frame_seq = torch.arange(n_seq).repeat_interleave(t)
    return gt, frame_seq


def _oracle(gt, size):
    """Ground-truth labels as features: one-hot maps [NF, 4, h, w] at the GT resolution."""
    lab = gt.long().clone()
    lab[lab == 255] = 0  # void pixels look like background
    grid = F.one_hot(lab, 4).permute(0, 3, 1, 2).float()
    return FeatureSet(grid, {size: gt}, torch.as_tensor(0), [size] * len(gt))


def _cfg(size, **kw):
    base = dict(eval_size=list(size), eval_size_dataset=list(size), niter=10, restarts=2, progress=False)
    base.update(kw)
    return EvalConfig(**base)


@pytest.mark.parametrize("cluster_at", ["pixel", "patch"])
def test_ground_truth_as_features_scores_100(cluster_at):
    gt, frame_seq = _gt_dataset()
    size = tuple(gt.shape[-2:])
    fs = _oracle(gt, size)
    fs.frame_seq = frame_seq
    cfg = _cfg(size, cluster_at=cluster_at, overcluster_k=[6])
    res = run_protocol(fs, cfg, ["s0", "s1", "s2"], seed=1, keep_seqs=[1])
    assert res["F"] == pytest.approx(100.0)
    assert res["C"] == pytest.approx(100.0)
    assert res["D"] == pytest.approx(100.0)
    assert res["overclustering"]["6"]["miou"] == pytest.approx(100.0)
    # label 1 is scored in D (the reference's x255 bug dropped it)
    assert res["D_iou_per_label"][1] == pytest.approx(100.0)
    assert res["K"]["D"] == 4
    assert [r["labels"] for r in res["per_sequence"]][1] == [0, 1, 2, 3]
    ov = res["overlays"][1]
    assert ov["pred"].shape == (3, *size)
    np.testing.assert_array_equal(ov["pred"][ov["gt"] != 255], ov["gt"][ov["gt"] != 255])


def test_scores_drop_for_features_that_ignore_the_ground_truth_and_seeds_reproduce():
    gt, frame_seq = _gt_dataset(seed=1)
    size = tuple(gt.shape[-2:])
    g = torch.Generator().manual_seed(0)
    fs = FeatureSet(torch.randn(len(gt), 16, 4, 5, generator=g), {size: gt}, frame_seq, [size] * len(gt))
    cfg = _cfg(size, pca_dim=8)
    a = run_protocol(fs, cfg, ["a", "b", "c"], seed=3)
    b = run_protocol(fs, cfg, ["a", "b", "c"], seed=3)
    for key in ("F", "C", "D"):
        assert 0 <= a[key] < 90
        assert a[key] == b[key]
    assert len(a["per_sequence"]) == 3
    assert a["per_sequence"][0]["frames"] == 3


def test_bilinear_points_match_interpolate():
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(2, 3, 4, 5, generator=g)
    H, W = 13, 17
    up = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
    f = torch.tensor([0, 1, 1, 0, 1])
    y = torch.tensor([0, 12, 5, 7, 3])
    x = torch.tensor([0, 16, 9, 2, 11])
    got = bilinear_points(grid, f, y, x, (H, W))
    torch.testing.assert_close(got, up[f, :, y, x])


@pytest.mark.parametrize("k", [3, 9])  # K <= D: upsampled scores; K > D: upsampled features
def test_assignment_equals_nearest_centroid_of_upsampled_features(k):
    g = torch.Generator().manual_seed(2)
    nf, d, h, w, H, W = 4, 6, 3, 4, 12, 16
    grid = torch.randn(nf, d, h, w, generator=g)
    cents = torch.randn(2, k, d, generator=g)
    pools = Pools.from_groups(torch.tensor([0, 0, 1, 1]), torch.tensor([k, k - 1]))
    gt = torch.zeros(nf, H, W, dtype=torch.uint8)
    _, kept = assign_confusion(grid, cents, pools, gt, 1, torch.arange(nf), nf, budget=10**6, keep=set(range(nf)))
    up = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
    for i in range(nf):
        p = 0 if i < 2 else 1
        c = cents[p, : pools.k[p]]
        dist = ((up[i].permute(1, 2, 0)[..., None, :] - c) ** 2).sum(-1)
        assert torch.equal(kept[i].long(), dist.argmin(-1))


def test_confusion_blocks_sum_pixels():
    g = torch.Generator().manual_seed(3)
    grid = torch.randn(3, 4, 2, 2, generator=g)
    gt = torch.randint(0, 3, (3, 6, 6), generator=g).to(torch.uint8)
    gt[0, 0, 0] = 255
    pools = Pools.from_groups(torch.zeros(3, dtype=torch.long), torch.tensor([2]))
    conf, _ = assign_confusion(grid, torch.randn(1, 2, 4, generator=g), pools, gt, 3,
                               torch.tensor([0, 1, 1]), 2, budget=50)
    assert conf.shape == (2, 3, 2)
    assert int(conf[0].sum()) == 35 and int(conf[1].sum()) == 72


def test_standardize_pca_decorrelates_and_orders_variance():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3
    z = standardize_pca(x, 4)
    assert z.shape == (500, 4)
    cov = torch.cov(z.T)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3
    var = torch.diag(cov)
    assert (var[:-1] >= var[1:]).all()
    assert standardize_pca(x, 0).shape == (500, 8)
    grid = torch.randn(4, 8, 2, 3, generator=g)
    out = reduce_grid(grid, torch.tensor([0, 0, 1, 1]), 3, True)
    assert out.shape == (4, 3, 2, 3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_oracle_and_assignment_match_cpu():
    gt, frame_seq = _gt_dataset()
    size = tuple(gt.shape[-2:])
    fs = _oracle(gt, size)
    fs = FeatureSet(fs.grid.cuda(), {size: gt.cuda()}, frame_seq.cuda(), fs.native_sizes)
    res = run_protocol(fs, _cfg(size, overcluster_k=[6]), ["s0", "s1", "s2"], seed=1)
    for key in ("F", "C", "D"):
        assert res[key] == pytest.approx(100.0)
    g = torch.Generator().manual_seed(2)
    grid = torch.randn(4, 6, 3, 4, generator=g)
    cents = torch.randn(1, 3, 6, generator=g)
    gt2 = torch.zeros(4, 12, 16, dtype=torch.uint8)
    pools = Pools.from_groups(torch.zeros(4, dtype=torch.long), torch.tensor([3]))
    a, _ = assign_confusion(grid, cents, pools, gt2, 1, torch.arange(4), 4, 10**6)
    pools_c = Pools.from_groups(torch.zeros(4, dtype=torch.long, device="cuda"), torch.tensor([3], device="cuda"))
    b, _ = assign_confusion(grid.cuda(), cents.cuda(), pools_c, gt2.cuda(), 1, torch.arange(4).cuda(), 4, 10**6)
    assert (a - b.cpu()).abs().sum() <= 4  # ties at most


def test_pool_with_more_clusters_than_points_is_named():
    from wtours.errors import UserError

    gt, frame_seq = _gt_dataset()
    size = tuple(gt.shape[-2:])  # 8x10 pixels per frame, 9 frames: 720 points in the dataset pool
    fs = _oracle(gt, size)
    fs.frame_seq = frame_seq
    with pytest.raises(UserError, match=r"overclustering \(--k / overcluster_k\) 721: K=721 clusters but only 720 "
                                        r"points to cluster \(9 frames x 8x10 pixels\)"):
        run_protocol(fs, _cfg(size, overcluster_k=[721]), ["s0", "s1", "s2"], seed=1)
    # patch tokens: a 1x1 grid per frame cannot hold the 3-4 labels of a frame (F is named)
    tiny = FeatureSet(torch.randn(len(gt), 4, 1, 1), {size: gt}, frame_seq, [size] * len(gt))
    with pytest.raises(UserError, match=r"F: frame 0 \('s0'\): K=\d clusters but only 1 points .*cluster_at=patch"):
        run_protocol(tiny, _cfg(size, cluster_at="patch"), ["s0", "s1", "s2"], seed=1)


def test_pca_per_batch_of_videos_and_batch_averaged_scores():
    """The reference fits scaler + PCA per loader batch of 16 videos and averages F / C per batch: batch pools of
    1 video equal clip pools, one batch of all videos equals the dataset pool; batch averages differ from the
    overall mean when batches differ in size."""
    gt, frame_seq = _gt_dataset(seed=2, n_seq=5)
    size = tuple(gt.shape[-2:])
    g = torch.Generator().manual_seed(0)
    fs = FeatureSet(torch.randn(len(gt), 16, 4, 5, generator=g), {size: gt}, frame_seq, [size] * len(gt))
    names = [f"s{i}" for i in range(5)]
    res = {}
    for key, kw in {"clip": dict(pca_scope="clip"), "batch1": dict(pca_scope="batch", batch_videos=1),
                    "dataset": dict(pca_scope="dataset"), "batch_all": dict(pca_scope="batch", batch_videos=5),
                    "batch2": dict(pca_scope="batch", batch_videos=2)}.items():
        res[key] = run_protocol(fs, _cfg(size, pca_dim=6, **kw), names, seed=3)
    assert res["batch1"]["F"] == res["clip"]["F"] and res["batch1"]["C"] == res["clip"]["C"]
    assert res["batch_all"]["F"] == res["dataset"]["F"] and res["batch_all"]["C"] == res["dataset"]["C"]
    assert (res["batch2"]["F"], res["batch2"]["C"]) != (res["clip"]["F"], res["clip"]["C"])
    # score_average=batch with batches of 2 videos: [s0, s1], [s2, s3], [s4]
    avg = run_protocol(fs, _cfg(size, pca_dim=6, score_average="batch", batch_videos=2), names, seed=3)
    plain = run_protocol(fs, _cfg(size, pca_dim=6), names, seed=3)
    c = np.array([r["C"] for r in plain["per_sequence"]])
    assert plain["C"] == pytest.approx(c.mean())
    assert avg["C"] == pytest.approx(np.mean([c[0:2].mean(), c[2:4].mean(), c[4]]))
    f = np.array([r["F"] for r in plain["per_sequence"]])  # 3 frames per clip: frame means = clip means of F
    assert avg["F"] == pytest.approx(np.mean([f[0:2].mean(), f[2:4].mean(), f[4]]), abs=1e-9)
    assert avg["D"] == plain["D"]
