"""Differentiable sorting networks (bitonic, odd-even) and the torchsort alternative."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from wtours.objectives.sorting import (
    bitonic_network,
    odd_even_network,
    rank_matching_loss,
    soft_permutation,
    soft_sort_cross_entropy,
    torchsort_problem,
)

KINDS = ("bitonic", "odd_even")


def _rows(r, n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, n, generator=g) * scale


# ----------------------------------------------------------------------------- networks


@pytest.mark.parametrize("kind", KINDS)
def test_hard_networks_sort_every_size(kind):
    rng = random.Random(0)
    for n in range(1, 70):
        net = bitonic_network(n) if kind == "bitonic" else odd_even_network(n)
        for _ in range(20):
            x = [rng.random() for _ in range(n)]
            assert net.hard_sort(x) == sorted(x), (kind, n)
    for n in range(1, 11):  # 0-1 principle: all binary inputs
        net = bitonic_network(n) if kind == "bitonic" else odd_even_network(n)
        for bits in itertools.product((0, 1), repeat=n):
            assert net.hard_sort(list(bits)) == sorted(bits), (kind, n, bits)


def test_network_shapes_for_49():
    b, o = bitonic_network(49), odd_even_network(49)
    assert (b.depth, o.depth) == (21, 49)  # 6*7/2 layers on 64 wires; n layers
    assert b.order == tuple(range(49))
    for net in (b, o):
        for a, c in net.layers:  # the wires of one layer are disjoint
            assert len(set(a) | set(c)) == 2 * len(a)


# ----------------------------------------------------------------------------- soft permutation matrices


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", ["autograd", "naive"])
def test_high_steepness_sorts_exactly(kind, impl):
    n = 49
    g = torch.Generator().manual_seed(1)
    x = torch.stack([torch.randperm(n, generator=g).float() / n for _ in range(6)])  # gaps of 1/49
    p = soft_permutation(x, kind, steepness=1e7, impl=impl)  # Cauchy tails: error ~ depth / (pi s gap)
    ranks = x.argsort(dim=1).argsort(dim=1)
    assert torch.equal(p.argmax(dim=2), ranks)  # input i lands at its true position
    assert float(p.max(dim=2).values.min()) > 0.999
    assert torch.allclose((x.unsqueeze(1) @ p).squeeze(1), x.sort(dim=1).values, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [7, 16, 49])
@pytest.mark.parametrize("steepness", [10.0, 100.0])
def test_soft_permutations_are_doubly_stochastic(kind, n, steepness):
    p = soft_permutation(_rows(8, n, seed=n, scale=0.3), kind, steepness)
    assert float(p.min()) >= 0
    assert torch.allclose(p.sum(dim=1), torch.ones(8, n), atol=2e-5)
    assert torch.allclose(p.sum(dim=2), torch.ones(8, n), atol=2e-5)
    assert float(p.max(dim=2).values.min()) < 0.999  # soft, not already hard


def _textbook_bitonic(n):
    """Comparators (min wire, max wire) per layer of a bitonic sorter, written out independently:
    2^k wires, the top 2^k - n discarded (valid for n = 49 and powers of two)."""
    k = math.ceil(math.log2(n))
    size, pad = 2 ** k, 2 ** k - n
    layers = []
    for block in range(k):
        for stage in range(block, -1, -1):
            m = 2 ** stage
            comps = []
            for i in range(size):
                j = i ^ m
                if j > i and i >= pad and j >= pad:
                    up = (i & (2 ** (block + 1))) == 0
                    comps.append((i - pad, j - pad) if up else (j - pad, i - pad))
            layers.append(comps)
    return layers


def _loop_soft_perm(x, layers, s):
    """diffsort's maths transcribed one comparator at a time, one row at a time (Python loops)."""
    n = len(x)
    x = [float(v) for v in x]
    p = [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]  # p[i][wire]
    for comps in layers:
        for a, b in comps:
            alpha = math.atan(s * (x[b] - x[a])) / math.pi + 0.5
            x[a], x[b] = alpha * x[a] + (1 - alpha) * x[b], (1 - alpha) * x[a] + alpha * x[b]
            for i in range(n):
                pa, pb = p[i][a], p[i][b]
                p[i][a], p[i][b] = alpha * pa + (1 - alpha) * pb, (1 - alpha) * pa + alpha * pb
    return torch.tensor(p, dtype=torch.float64)


@pytest.mark.parametrize("n", [16, 49])
def test_bitonic_equals_a_per_comparator_loop(n):
    x = _rows(3, n, seed=7, scale=0.2).double()
    layers = _textbook_bitonic(n)
    want = torch.stack([_loop_soft_perm(row, layers, 100.0) for row in x])
    for impl in ("autograd", "naive"):
        got = soft_permutation(x.float(), "bitonic", 100.0, impl=impl).double()
        assert torch.allclose(got, want, atol=2e-5), (impl, float((got - want).abs().max()))
    # the fused lean loss agrees with the loop's permutation matrices
    xt = x + 0.01
    pt = torch.stack([_loop_soft_perm(row, layers, 100.0) for row in xt])
    ce_want = -(pt * want.clamp_min(1e-12).log()).sum(-1)
    ce, ent = soft_sort_cross_entropy(x.float(), xt.float(), "bitonic", 100.0, 100.0, impl="lean")
    assert torch.allclose(ce.double(), ce_want, atol=1e-3, rtol=1e-4)
    assert torch.allclose(ent.double(), -(pt * pt.clamp_min(1e-12).log()).sum(-1), atol=1e-3, rtol=1e-4)


# ----------------------------------------------------------------------------- gradients and memory


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite_at_steepness_1000(kind):
    n = 49
    x = _rows(6, n, seed=3, scale=0.05)
    x[:, 1] = x[:, 0]  # exact ties
    x[:, 3] = x[:, 2] + 1e-7  # near ties
    xt = x + 1e-3 * _rows(6, n, seed=4)
    grads = {}
    for impl in ("lean", "autograd", "naive"):
        xs = x.clone().requires_grad_(True)
        ce, _ = soft_sort_cross_entropy(xs, xt, kind, 1000.0, 1000.0, impl=impl)
        assert bool(torch.isfinite(ce).all())
        ce.mean().backward()
        assert bool(torch.isfinite(xs.grad).all()) and float(xs.grad.abs().max()) > 0
        grads[impl] = xs.grad
    scale = float(grads["autograd"].abs().max())
    assert float((grads["lean"] - grads["autograd"]).abs().max()) < 1e-3 * scale
    assert float((grads["naive"] - grads["autograd"]).abs().max()) < 1e-3 * scale


@pytest.mark.parametrize("kind", KINDS)
def test_lean_backward_matches_autograd_and_chunks(kind):
    n = 49
    x, xt = _rows(10, n, seed=5, scale=0.1), _rows(10, n, seed=6, scale=0.1)
    w = torch.rand(10, n, generator=torch.Generator().manual_seed(0))
    out = {}
    for impl, chunk in (("autograd", 0), ("lean", 0), ("lean", 3)):
        xs = x.clone().requires_grad_(True)
        ce, ent = soft_sort_cross_entropy(xs, xt, kind, 100.0, 100.0, impl=impl, chunk_rows=chunk)
        (ce * w).sum().backward()
        out[(impl, chunk)] = (ce.detach(), ent, xs.grad)
    ref = out[("autograd", 0)]
    for key in (("lean", 0), ("lean", 3)):
        for a, b in zip(out[key], ref):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())), key
    assert all(torch.equal(a, b) for a, b in zip(out[("lean", 0)], out[("lean", 3)]))


def test_lean_keeps_only_its_inputs_for_backward():
    from wtours.bench.neco import _saved_bytes

    r, n = 64, 49
    saved = {}
    for impl in ("lean", "naive", "autograd"):
        xs = _rows(r, n).requires_grad_(True)
        hooks, total = _saved_bytes()
        with hooks:
            ce, _ = soft_sort_cross_entropy(xs, _rows(r, n, seed=1), "bitonic", impl=impl)
        ce.sum().backward()
        saved[impl] = total[0]
    assert saved["lean"] <= 2 * r * n * 4 + 1024  # the two [R, n] fp32 inputs
    assert saved["naive"] > 50 * saved["lean"] and saved["autograd"] > 50 * saved["lean"]


def test_teacher_gets_no_gradient_and_student_equal_teacher_is_the_minimum():
    x = _rows(5, 49, scale=0.1)
    xs = x.clone().requires_grad_(True)
    xt = x.clone().requires_grad_(True)
    ce, ent = soft_sort_cross_entropy(xs, xt, "bitonic")
    assert torch.allclose(ce, ent, atol=1e-6)  # cross-entropy of a distribution with itself = its entropy
    ce.sum().backward()
    assert xt.grad is None and xs.grad is not None
    assert float(xs.grad.abs().max()) < 1e-3 * max(1.0, float(ce.detach().abs().max()))  # a minimum: ~zero gradient
    ce2, _ = soft_sort_cross_entropy(x + 0.05 * _rows(5, 49, seed=9), x, "bitonic")
    assert float(ce2.mean()) > float(ce.detach().mean()) + 1e-3


# ----------------------------------------------------------------------------- torchsort


def test_torchsort_rank_matching():
    if torchsort_problem("cpu"):
        pytest.skip(f"torchsort unavailable: {torchsort_problem('cpu')}")
    x = _rows(6, 49, scale=0.1)
    assert float(rank_matching_loss(x, x).max()) < 1e-10
    xs = (x + 0.05 * _rows(6, 49, seed=2)).requires_grad_(True)
    loss = rank_matching_loss(xs, x)
    assert loss.shape == (6,) and float(loss.detach().min()) > 0
    loss.sum().backward()
    assert bool(torch.isfinite(xs.grad).all()) and float(xs.grad.abs().max()) > 0


def test_missing_torchsort_is_one_clear_line(monkeypatch):
    import sys

    from wtours.errors import UserError

    monkeypatch.setitem(sys.modules, "torchsort", None)  # import torchsort -> ImportError
    problem = torchsort_problem("cpu")
    assert problem and "torchsort" in problem and "\n" not in problem
    with pytest.raises(UserError, match="loss.sorter"):
        rank_matching_loss(_rows(2, 4), _rows(2, 4))
