"""DAVIS-2017 J / F / J&F (wtours.eval.davis_metrics) against a plain transcription of the official
definitions (per frame, per object, numpy + scipy dilation with a disk), on hand-made fixtures."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_dilation

from wtours.errors import UserError
from wtours.eval.davis_metrics import (
    db_statistics, dilate_disk, evaluate_sequence, f_boundary, j_region, seg2bmap, summarize,
)


# ------------------------------------------------------------------ the official definitions, one frame at a time
def ref_iou(a, s):
    a, s = a.astype(bool), s.astype(bool)
    union = np.sum(a | s)
    return 1.0 if np.isclose(union, 0) else np.sum(a & s) / union


def ref_seg2bmap(seg):
    seg = seg.astype(bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def ref_disk(r):
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    return (x * x + y * y) <= r * r


def ref_boundary(fg, gt, bound_th=0.008):
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(fg.shape))
    fb, gb = ref_seg2bmap(fg), ref_seg2bmap(gt)
    fd = binary_dilation(fb, ref_disk(int(bound_pix)))
    gd = binary_dilation(gb, ref_disk(int(bound_pix)))
    gt_match, fg_match = gb * fd, fb * gd
    n_fg, n_gt = np.sum(fb), np.sum(gb)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def ref_statistics(v):
    M = np.nanmean(v)
    O = np.nanmean(v > 0.5)
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.uint8)
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return M, O, np.nanmean(bins[0]) - np.nanmean(bins[3])


def ref_sequence(gt, pred):
    """Per-object J / F over frames 1..T-2 exactly as evaluation.py / davis.py / results.py."""
    gt = np.where(gt == 255, 0, gt)
    n = int(gt[0].max())
    n_res = int(pred.max())
    assert n_res <= n
    j = np.zeros((n, gt.shape[0] - 2))
    f = np.zeros_like(j)
    for o in range(1, n + 1):
        for t in range(1, gt.shape[0] - 1):
            j[o - 1, t - 1] = ref_iou(gt[t] == o, pred[t] == o)
            f[o - 1, t - 1] = ref_boundary(pred[t] == o, gt[t] == o)
    return j, f


# ------------------------------------------------------------------ fixtures
def random_blobs(rng, t, h, w, n_obj, p_vanish=0.2):
    """Label maps [T, H, W] of ``n_obj`` moving rectangles/ellipses, some frames without some objects."""
    out = np.zeros((t, h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for o in range(1, n_obj + 1):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(1, h / 3), rng.uniform(1, w / 3)
        vy, vx = rng.normal(0, 2, 2)
        for k in range(t):
            if k > 0 and rng.random() < p_vanish:
                continue
            m = ((yy - cy - vy * k) / ry) ** 2 + ((xx - cx - vx * k) / rx) ** 2 <= 1
            out[k][m] = o
    return out


def test_seg2bmap_and_disk_dilation_equal_the_reference():
    rng = np.random.default_rng(0)
    for trial in range(20):
        h, w = rng.integers(3, 40, 2)
        seg = rng.random((h, w)) < rng.uniform(0.05, 0.9)
        b = seg2bmap(torch.from_numpy(seg)).numpy()
        np.testing.assert_array_equal(b, ref_seg2bmap(seg))
        for r in (0, 1, 2, 3, 5, 8):
            d = dilate_disk(torch.from_numpy(b), r).numpy()
            ref = binary_dilation(b, ref_disk(r)) if r else b
            np.testing.assert_array_equal(d, ref, err_msg=f"r={r} trial={trial}")


def test_j_and_f_equal_the_official_definitions_per_frame():
    rng = np.random.default_rng(1)
    for trial in range(6):
        h, w = int(rng.integers(20, 70)), int(rng.integers(20, 90))
        gt = random_blobs(rng, 7, h, w, 3)
        pred = random_blobs(rng, 7, h, w, int(rng.integers(0, 4)))
        s = evaluate_sequence("s", torch.from_numpy(gt), torch.from_numpy(pred))
        j, f = ref_sequence(gt, pred)
        np.testing.assert_allclose(s.j, j, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s.f, f, rtol=0, atol=1e-12)
        assert s.objects == list(range(1, int(gt[0].max()) + 1))


def test_edge_cases_empty_masks_single_pixels_and_tolerance():
    e = torch.zeros(9, 9, dtype=torch.bool)
    one = e.clone()
    one[4, 4] = True
    near = e.clone()
    near[4, 5] = True
    # empty vs empty: J = F = 1; empty vs object: J = F = 0
    assert j_region(e, e).item() == 1.0 and f_boundary(e, e).item() == 1.0
    assert j_region(one, e).item() == 0.0 and f_boundary(one, e).item() == 0.0
    assert f_boundary(e, one).item() == 0.0
    # one pixel each, one apart: IoU 0, but the boundaries are within the tolerance (ceil(0.008*12.7) = 1 px)
    assert j_region(one, near).item() == 0.0
    assert f_boundary(one, near).item() == pytest.approx(ref_boundary(near.numpy(), one.numpy()))
    assert f_boundary(one, near).item() == 1.0
    far = e.clone()
    far[0, 0] = True
    assert f_boundary(one, far).item() == 0.0 == ref_boundary(far.numpy(), one.numpy())
    # a one-pixel object in the bottom-right corner: the corner itself is never a boundary pixel (the
    # reference's corner rule), its west / north neighbours are
    corner = e.clone()
    corner[-1, -1] = True
    b = seg2bmap(corner)
    assert not b[-1, -1] and b[-1, -2] and b[-2, -1] and b[-2, -2] and int(b.sum()) == 3
    np.testing.assert_array_equal(b.numpy(), ref_seg2bmap(corner.numpy()))
    assert f_boundary(corner, corner).item() == 1.0 == ref_boundary(corner.numpy(), corner.numpy())


def test_objects_that_vanish_and_fewer_predicted_objects():
    gt = np.zeros((5, 12, 12), np.uint8)
    gt[:, 2:6, 2:6] = 1
    gt[0, 7:10, 7:10] = 2  # object 2 is in the first frame only: later frames score empty vs empty
    gt[2, 7:10, 7:10] = 2  # ... except frame 2
    pred = np.zeros_like(gt)
    pred[:, 2:6, 2:6] = 1  # object 2 never predicted
    s = evaluate_sequence("v", torch.from_numpy(gt), torch.from_numpy(pred))
    j, f = ref_sequence(gt, pred)
    np.testing.assert_allclose(s.j, j)
    np.testing.assert_allclose(s.f, f)
    assert s.j.shape == (2, 3)  # frames 1..3
    np.testing.assert_array_equal(s.j[1], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(s.f[1], [1.0, 0.0, 1.0])


def test_void_is_background_and_extra_predicted_objects_are_refused():
    gt = np.zeros((4, 8, 8), np.uint8)
    gt[:, 1:4, 1:4] = 1
    gt[:, 6:, 6:] = 255
    pred = (gt == 1).astype(np.uint8)
    s = evaluate_sequence("v", torch.from_numpy(gt), torch.from_numpy(pred))
    assert s.j.shape == (1, 2) and np.all(s.j == 1) and np.all(s.f == 1)
    pred[2, 0, 0] = 2
    with pytest.raises(UserError, match="object id 2"):
        evaluate_sequence("v", torch.from_numpy(gt), torch.from_numpy(pred))


def test_statistics_equal_the_reference():
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 4, 5, 7, 20, 83):
        v = rng.random(n)
        assert db_statistics(v) == pytest.approx(ref_statistics(v), nan_ok=True)
    v = np.array([1.0, 1.0, 0.2, 0.2, 0.0, 0.0, 0.0, 0.0])
    m, r, d = db_statistics(v)
    # bins overlap by one frame (ids 0, 2, 4, 5, 7): first = v[0:3], last = v[5:8]
    assert m == pytest.approx(0.3) and r == pytest.approx(0.25) and d == pytest.approx(2.2 / 3)


def test_oracle_is_100_and_relabelling_objects_changes_nothing():
    rng = np.random.default_rng(4)
    gts = [random_blobs(rng, 8, 30, 40, n) for n in (2, 3)]
    for g in gts:
        g[0] = np.where(g[0] == 0, 0, g[0])
        for o in range(1, int(g.max()) + 1):  # make sure every object is in the first frame
            if not (g[0] == o).any():
                g[0, o, o] = o
    oracle = summarize([evaluate_sequence(f"s{i}", torch.from_numpy(g), torch.from_numpy(g)) for i, g in enumerate(gts)])
    assert oracle["J-Mean"] == 1.0 and oracle["F-Mean"] == 1.0 and oracle["J&F-Mean"] == 1.0
    assert oracle["J-Recall"] == 1.0 and oracle["J-Decay"] == 0.0
    preds = [random_blobs(rng, 8, 30, 40, int(g[0].max())) for g in gts]
    base = summarize([evaluate_sequence(f"s{i}", torch.from_numpy(g), torch.from_numpy(p))
                      for i, (g, p) in enumerate(zip(gts, preds))])
    assert 0 < base["J&F-Mean"] < 1
    perms = []
    for g in gts:
        n = int(g[0].max())
        perm = np.arange(256, dtype=np.uint8)
        perm[1:n + 1] = rng.permutation(np.arange(1, n + 1))
        perms.append(perm)
    relabelled = summarize([evaluate_sequence(f"s{i}", torch.from_numpy(pm[g]), torch.from_numpy(pm[p]))
                            for i, (g, p, pm) in enumerate(zip(gts, preds, perms))])
    for k in ("J-Mean", "F-Mean", "J&F-Mean", "J-Recall", "F-Recall"):
        assert relabelled[k] == pytest.approx(base[k], abs=1e-12)
    # J&F is object-weighted: the mean over all objects, not over sequences
    rows = base["per_object"]
    assert len(rows) == 5
    assert base["J-Mean"] == pytest.approx(np.mean([r["J-Mean"] for r in rows]))
    assert base["J&F-Mean"] == pytest.approx((base["J-Mean"] + base["F-Mean"]) / 2)
    assert not math.isnan(base["F-Decay"])
