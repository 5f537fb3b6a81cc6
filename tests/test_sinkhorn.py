"""Sinkhorn-Knopp: DoRA's marginals, agreement with POT, batching, numerical robustness."""

import numpy as np
import ot
import pytest
import torch

from wtours.objectives.sinkhorn import sinkhorn_knopp


def _scores(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _reference_exp_domain(scores, eps, iters):
    """The DoRA reference algorithm (exp domain, per-sample max), transcribed from dora.md §3."""
    n, k = scores.shape[-2:]
    q = torch.exp((scores - scores.amax(dim=(-2, -1), keepdim=True)) / eps).double().transpose(-2, -1)  # [.., k, n]
    q = q / q.sum(dim=(-2, -1), keepdim=True)
    for _ in range(iters):
        q = q / q.sum(-1, keepdim=True) / k   # every object row -> 1/k
        q = q / q.sum(-2, keepdim=True) / n   # every patch column -> 1/n
    return (q * n).transpose(-2, -1)


@pytest.mark.parametrize("n,k", [(196, 3), (49, 5), (16, 2)])
def test_marginals_rows_one_columns_n_over_k(n, k):
    # cosine-like scores (|s| < 1): DoRA's 30 iterations already equipartition well
    m = sinkhorn_knopp(_scores(4, n, k, seed=n, scale=0.3), eps=0.05, iters=30)
    assert m.shape == (4, n, k) and m.dtype == torch.float32
    assert (m >= 0).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(4, n), atol=1e-5, rtol=0)
    torch.testing.assert_close(m.sum(-2), torch.full((4, k), n / k), atol=5e-3 * n / k, rtol=0)
    # peaked scores need more iterations for the column marginals; rows are always exact
    s = _scores(4, n, k, seed=n, scale=1.0)
    few, many = sinkhorn_knopp(s, iters=30), sinkhorn_knopp(s, iters=1000)
    torch.testing.assert_close(many.sum(-2), torch.full((4, k), n / k), atol=1e-4 * n / k, rtol=0)
    assert (few.sum(-2) - n / k).abs().max() > (many.sum(-2) - n / k).abs().max()
    torch.testing.assert_close(few.sum(-1), torch.ones(4, n), atol=1e-5, rtol=0)


def test_equals_reference_exp_domain_algorithm():
    s = _scores(3, 196, 3, seed=1, scale=0.3)  # moderate scores so the exp-domain version is exact
    ours = sinkhorn_knopp(s, eps=0.05, iters=30)
    torch.testing.assert_close(ours.double(), _reference_exp_domain(s, 0.05, 30), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_pot_up_to_n_scaling(seed):
    n, k, eps = 60, 4, 0.1
    s = _scores(n, k, seed=seed)
    a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
    plan = ot.sinkhorn(a, b, -s.double().numpy(), reg=eps, method="sinkhorn_log",
                       numItermax=100000, stopThr=1e-12)
    ours = sinkhorn_knopp(s, eps=eps, iters=3000)
    np.testing.assert_allclose(ours.double().numpy(), n * plan, atol=2e-5, rtol=1e-3)
    # and a 30-iteration plan is already close in column marginals, exact in rows
    short = sinkhorn_knopp(s, eps=eps, iters=30)
    np.testing.assert_allclose(short.sum(-1).numpy(), 1.0, atol=1e-5)


def test_batched_equals_unbatched():
    s = _scores(2, 3, 49, 3, seed=5)
    batched = sinkhorn_knopp(s)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(batched[i, j], sinkhorn_knopp(s[i, j]), atol=1e-6, rtol=1e-5)


def test_stable_with_huge_and_infinite_scores():
    s = _scores(3, 196, 3, seed=7, scale=1e6)
    s[0, 5, 1] = float("inf")
    s[1, 7, 2] = float("-inf")
    s[2] = 3e38
    s[2, 0, 0] = -3e38
    m = sinkhorn_knopp(s)
    assert torch.isfinite(m).all()
    torch.testing.assert_close(m.sum(-1), torch.ones(3, 196), atol=1e-5, rtol=0)
    # huge scores -> near-hard assignment: every patch goes (almost) entirely to one object
    assert (m[:2].amax(-1) > 0.99).float().mean() > 0.9


def test_half_inputs_and_autocast_give_fp32():
    s = _scores(2, 16, 3, seed=3).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = sinkhorn_knopp(s)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, sinkhorn_knopp(s.float()), atol=1e-6, rtol=1e-5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(5))
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.zeros(5, 2), eps=0.0)
