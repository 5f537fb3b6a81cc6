"""DINO head (shapes, weight norm, frozen g) and the EMA teacher update / cosine schedules."""

import copy
import math

import pytest
import torch
from torch import nn

from wtours.models.ema import cosine_schedule, ema_update_
from wtours.models.heads import DINOHead


def test_head_shapes_and_structure():
    head = DINOHead(48, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    y = head(torch.randn(5, 48))
    assert y.shape == (5, 100)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(48, 64), (64, 64), (64, 16)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    assert head.last_layer.bias is None
    names = [n for n, _ in head.named_parameters() if "last_layer" in n]
    assert sorted(names) == ["last_layer.parametrizations.weight.original0",
                             "last_layer.parametrizations.weight.original1"]


def test_head_last_layer_is_weight_normalised_with_g_one():
    head = DINOHead(48, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    g = head.last_layer.parametrizations.weight.original0
    assert torch.equal(g, torch.ones(100, 1)) and g.requires_grad
    # rows of the effective weight have unit norm; outputs are cosines of unit vectors
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(100))
    assert head(torch.randn(7, 48)).abs().max() <= 1 + 1e-5


def test_head_norm_last_layer_freezes_g():
    head = DINOHead(48, out_dim=10, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    head(torch.randn(3, 48)).sum().backward()
    assert head.last_layer.parametrizations.weight.original1.grad is not None


def _target_kl(mode: str, gain: float) -> tuple[torch.Tensor, torch.dtype]:
    """Mean KL(q_fp32 || q_bf16) of sharp teacher targets (tau 0.04) of a head run under bf16 autocast (CPU)."""
    from wtours.objectives.dino import teacher_probs

    torch.manual_seed(0)
    head = DINOHead(64, out_dim=4096, hidden_dim=256, bottleneck_dim=32, fp32=mode).eval()
    x = torch.randn(64, 64).to(torch.bfloat16).float()  # what a bf16 backbone hands over
    zero = torch.zeros(1, 4096)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original0.fill_(gain)
        ref = teacher_probs(head(x), zero, 0.04).double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(x)
        q = teacher_probs(logits, zero, 0.04).double()
    return (ref * (ref.clamp_min(1e-300).log() - q.clamp_min(1e-300).log())).sum(-1).mean(), logits.dtype


def test_head_runs_in_fp32_under_bf16_autocast():
    """Issue 12: bf16 logits move sharp teacher targets by ~1e-3 nats; the fp32 head (default) does not."""
    off, dtype_off = _target_kl("off", 8.0)
    last, dtype_last = _target_kl("last_layer", 8.0)
    head, dtype_head = _target_kl("head", 8.0)
    assert dtype_off == torch.bfloat16 and dtype_last == dtype_head == torch.float32
    assert off > 3e-4  # what bf16 did
    assert last < off / 1.5 and head < off / 10 and head < 1e-4, (off, last, head)
    assert DINOHead(8, out_dim=4, hidden_dim=8, bottleneck_dim=4).fp32 == "head"
    with pytest.raises(ValueError, match="fp32 must be"):
        DINOHead(8, out_dim=4, fp32="bf16")


def test_fp32_head_trains_under_autocast():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(torch.randn(4, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.float32
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in head.parameters() if p.requires_grad)


def _pair():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    return teacher, student


@pytest.mark.parametrize("m", [1.0, torch.tensor(1.0)])
def test_ema_momentum_one_keeps_teacher(m):
    teacher, student = _pair()
    before = [p.clone() for p in teacher.parameters()]
    ema_update_(teacher, student, m)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


@pytest.mark.parametrize("m", [0.0, torch.tensor(0.0)])
def test_ema_momentum_zero_copies_student(m):
    teacher, student = _pair()
    ema_update_(teacher, student, m)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


@pytest.mark.parametrize("m", [0.996, torch.tensor(0.9)])
def test_ema_foreach_equals_loop(m):
    teacher, student = _pair()
    expected = copy.deepcopy(teacher)
    mf = float(m)
    with torch.no_grad():
        for pt, ps in zip(expected.parameters(), student.parameters()):
            pt.mul_(mf).add_((1 - mf) * ps)
    ema_update_(teacher, student, m)
    for a, b in zip(teacher.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not any(p.grad is not None for p in teacher.parameters())


def test_ema_rejects_mismatched_models():
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.5)


def test_cosine_schedule_values():
    s = cosine_schedule(0.996, 1.0, 100)
    assert s.shape == (100,) and s.dtype == torch.float64
    assert s[0] == pytest.approx(0.996) and s[50] == pytest.approx(0.998)
    assert bool((s[1:] >= s[:-1]).all()) and s[-1] < 1.0
    assert s[-1] == pytest.approx(1.0 - 0.002 * (1 + math.cos(math.pi * 99 / 100)))
    w = cosine_schedule(1e-3, 1e-5, 20, warmup_steps=5, start_warmup=0.0)
    assert w.shape == (20,)
    torch.testing.assert_close(w[:5], torch.linspace(0, 1e-3, 5, dtype=torch.float64))
    assert w[5] == pytest.approx(1e-3) and w[-1] > 1e-5
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 5, warmup_steps=6)
