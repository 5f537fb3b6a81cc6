"""Cluster matching and mIoU (wtours.eval.metrics)."""

import itertools

import numpy as np
import pytest
import torch

from wtours.eval.metrics import cluster_miou, confusion, match_confusion


def _random_maps(rng, shape=(3, 20, 24), n_gt=4, n_pred=4, noise=0.3):
    gt = rng.integers(0, n_gt, size=shape)
    pred = np.where(rng.random(shape) < noise, rng.integers(0, n_pred, size=shape), gt % n_pred)
    return pred, gt


def _miou_of_mapping(conf, mapping):
    """Reference mIoU for a cluster -> label mapping (-1: nowhere), by explicit sums."""
    g_n, k_n = conf.shape
    ious = []
    for g in range(g_n):
        gt = conf[g].sum()
        if gt == 0:
            continue
        tp = sum(conf[g, c] for c in range(k_n) if mapping[c] == g)
        pred = sum(conf[:, c].sum() for c in range(k_n) if mapping[c] == g)
        ious.append(tp / (gt + pred - tp))
    return float(np.mean(ious))


def test_ground_truth_as_prediction_scores_one_in_both_modes():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(2, 16, 16))
    assert cluster_miou(gt, gt) == pytest.approx(1.0)
    assert cluster_miou(gt, gt, mode="majority") == pytest.approx(1.0)


def test_relabelling_clusters_changes_nothing():
    rng = np.random.default_rng(1)
    pred, gt = _random_maps(rng, n_pred=5)
    perm = np.array([17, 3, 250, 42, 9])  # non-contiguous, shuffled ids
    for mode in ("hungarian", "majority"):
        assert cluster_miou(perm[pred], gt, mode) == pytest.approx(cluster_miou(pred, gt, mode))


def test_hand_computed_example_and_majority_is_not_always_better():
    # bg 100 px, fg 10 px. Cluster A: 89 bg. Cluster B: 11 bg + 10 fg.
    gt = np.array([0] * 100 + [1] * 10)
    pred = np.array([0] * 89 + [1] * 11 + [1] * 10)
    hun = (89 / 100 + 10 / 21) / 2
    assert cluster_miou(pred, gt) == pytest.approx(hun)
    assert cluster_miou(pred, gt, mode="majority") == pytest.approx((100 / 110 + 0) / 2)
    assert cluster_miou(pred, gt) > cluster_miou(pred, gt, mode="majority")


@pytest.mark.parametrize("n_gt,n_pred", [(3, 3), (4, 4), (5, 3), (4, 2)])
def test_hungarian_agrees_with_brute_force(n_gt, n_pred):
    rng = np.random.default_rng(n_gt * 10 + n_pred)
    for _ in range(5):
        conf = rng.integers(0, 50, size=(n_gt, n_pred)).astype(np.float64)
        conf[:, 0] += 5  # every cluster and label non-empty
        conf[0] += 5
        best = max(
            _miou_of_mapping(conf, np.array(labels))
            for labels in itertools.permutations(range(n_gt), n_pred)
        )
        assert match_confusion(conf, "hungarian").miou == pytest.approx(best)


def test_unmatched_clusters_go_to_background():
    # 2 labels, 3 clusters: Hungarian matches two, the third becomes background (label 0).
    gt = np.array([0] * 10 + [1] * 10)
    pred = np.array([0] * 5 + [2] * 5 + [1] * 10)
    res = cluster_miou(pred, gt, return_details=True)
    assert res.miou == pytest.approx(1.0)
    assert dict(zip(res.clusters.tolist(), res.mapping.tolist())) == {0: 0, 1: 1, 2: 0}


def test_majority_matches_the_best_pixel_accuracy_and_refinements():
    rng = np.random.default_rng(3)
    for _ in range(20):
        pred, gt = _random_maps(rng, n_gt=4, n_pred=int(rng.integers(2, 8)), noise=0.6)
        hun = cluster_miou(pred, gt, return_details=True)
        maj = cluster_miou(pred, gt, mode="majority", return_details=True)
        assert maj.accuracy >= hun.accuracy - 1e-12
    # A clustering that refines the ground truth (each cluster inside one label): majority is
    # perfect, Hungarian (one-to-one) is not.
    gt = rng.integers(0, 3, size=(30, 30))
    pred = gt * 4 + rng.integers(0, 4, size=gt.shape)
    assert cluster_miou(pred, gt, mode="majority") == pytest.approx(1.0)
    assert cluster_miou(pred, gt) < 0.6


def test_ignore_index_pixels_are_left_out():
    gt = np.array([0, 0, 1, 1, 255, 255])
    pred = np.array([0, 0, 1, 1, 0, 1])
    assert cluster_miou(pred, gt) == pytest.approx(1.0)
    assert cluster_miou(pred, gt, ignore_index=None) < 1.0


def test_confusion_by_bincount_matches_a_histogram():
    rng = np.random.default_rng(4)
    pred, gt = _random_maps(rng, n_gt=5, n_pred=6)
    gt[0, :3] = 255
    conf = confusion(torch.as_tensor(pred), torch.as_tensor(gt), 5, 6).numpy()
    keep = gt != 255
    hist, _, _ = np.histogram2d(gt[keep], pred[keep], bins=[np.arange(6), np.arange(7)])
    np.testing.assert_array_equal(conf, hist)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        cluster_miou(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="mode"):
        match_confusion(np.ones((2, 2)), "best")
    assert np.isnan(cluster_miou(np.zeros(3), np.full(3, 255)))
