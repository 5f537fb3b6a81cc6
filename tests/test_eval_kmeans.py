"""Batched torch k-means (wtours.eval.kmeans)."""

import pytest
import torch

from wtours.eval.kmeans import assign, kmeans, kmeans_fit
from wtours.eval.metrics import cluster_miou


def _blobs(n_per, centers, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.as_tensor(centers, dtype=torch.float32)
    x = torch.cat([c + spread * torch.randn(n_per, centers.shape[1], generator=g) for c in centers])
    y = torch.arange(len(centers)).repeat_interleave(n_per)
    return x, y


def test_recovers_well_separated_blobs():
    centers = torch.eye(5) * 4
    x, y = _blobs(60, centers)
    labels, c = kmeans(x, 5, niter=20, restarts=3, seed=0)
    assert cluster_miou(labels, y) == pytest.approx(1.0)
    # every centroid sits on one true centre
    d = torch.cdist(c, centers)
    assert d.min(1).values.max() < 0.1


def test_batched_problems_with_different_k():
    x1, y1 = _blobs(40, torch.eye(3) * 5, seed=1)
    x2, y2 = _blobs(24, torch.eye(3)[:2] * 5, seed=2)  # 2 clusters, padded to 120 points
    x2p = torch.cat([x2, torch.full((120 - 48, 3), 1e3)])  # padding far away must be ignored
    valid = torch.ones(2, 120, dtype=torch.bool)
    valid[1, 48:] = False
    c, inertia = kmeans_fit(torch.stack([x1, x2p]), torch.tensor([3, 2]), valid=valid, niter=15, restarts=2)
    assert c.shape == (2, 3, 3)
    labels, _ = assign(torch.stack([x1, x2p]), c, torch.tensor([3, 2]))
    assert labels[1].max() <= 1  # the masked third centroid is never used
    assert cluster_miou(labels[0], y1) == pytest.approx(1.0)
    assert cluster_miou(labels[1, :48], y2) == pytest.approx(1.0)
    assert (c[1, :2].abs() < 10).all()  # not dragged towards the padding
    assert inertia[1] < 1.0


def test_seeded_runs_are_reproducible_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 300, 6, generator=g)
    k = torch.tensor([3, 5, 2, 4])
    a, ia = kmeans_fit(x, k, niter=10, restarts=2, seed=11)
    b, ib = kmeans_fit(x, k, niter=10, restarts=2, seed=11)
    torch.testing.assert_close(a, b)
    la, _ = assign(x, a, k)
    lb, _ = assign(x, a, k, budget=2000)  # small budget: many chunks
    assert torch.equal(la, lb)
    # inertia returned = sum of squared distances to the assigned centroids
    _, d = assign(x, a, k)
    torch.testing.assert_close(ia, d.sum(1), rtol=1e-4, atol=1e-3)


def test_restarts_never_increase_inertia_for_the_same_seed_stream():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 400, 4, generator=g)
    _, one = kmeans_fit(x, 8, niter=5, restarts=1, seed=3)
    _, many = kmeans_fit(x, 8, niter=5, restarts=4, seed=3)
    assert many[0] <= one[0] + 1e-5  # the first restart is the same run


def test_subsampled_fit_assigns_every_point():
    x, y = _blobs(500, torch.eye(4) * 3, seed=3)
    labels, c = kmeans(x, 4, niter=10, restarts=1, max_points=200)
    assert labels.shape == (2000,)
    assert cluster_miou(labels, y) == pytest.approx(1.0)


def test_k_must_be_positive():
    with pytest.raises(ValueError):
        kmeans_fit(torch.randn(10, 2), 0)


def test_more_clusters_than_points_is_refused_before_any_work():
    import time

    from wtours.errors import UserError
    from wtours.eval.kmeans import KMeansError

    x = torch.randn(50, 3)
    t0 = time.perf_counter()
    with pytest.raises(KMeansError, match="K=100000 clusters but only 50 points") as e:
        kmeans_fit(x, 100_000)  # used to loop 100k k-means++ steps, for ever at real sizes
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    # batched: padding does not count as points; the failing problem is named
    xs = torch.randn(2, 10, 3)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 4:] = False
    with pytest.raises(KMeansError, match=r"K=5 clusters but only 4 points to cluster \(problem 1 of 2\)"):
        kmeans_fit(xs, torch.tensor([3, 5]), valid=valid)
    c, _ = kmeans_fit(xs, torch.tensor([3, 4]), valid=valid, niter=2, restarts=1)  # K = points is fine
    assert c.shape == (2, 4, 3)
    with pytest.raises(KMeansError, match="only 8 points"):
        kmeans(torch.randn(20, 2), 10, max_points=8)
