"""DINOLoss: value equals the hand-written formula; centre EMA; fp32 under autocast."""

import pytest
import torch
import torch.nn.functional as F

from wtours.objectives.dino import DINOLoss


def _hand(student, teacher, center, tau_s, tau_t):
    q = F.softmax((teacher - center) / tau_t, dim=-1)
    total = 0.0
    for s in student:                       # S student views
        for i in range(teacher.shape[0]):   # M images
            total += -(q[i] * F.log_softmax(s[i] / tau_s, dim=-1)).sum()
    return total / (student.shape[0] * teacher.shape[0])


def test_equals_hand_formula_with_nonzero_center():
    g = torch.Generator().manual_seed(0)
    crit = DINOLoss(out_dim=11, student_temp=0.1)
    crit.center.copy_(torch.randn(1, 11, generator=g))
    s, t = torch.randn(3, 4, 11, generator=g), torch.randn(4, 11, generator=g)
    got = crit(s, t, teacher_temp=0.04)
    torch.testing.assert_close(got, _hand(s, t, crit.center, 0.1, 0.04), atol=1e-5, rtol=1e-5)
    got_t = crit(s, t, teacher_temp=torch.tensor(0.07))
    torch.testing.assert_close(got_t, _hand(s, t, crit.center, 0.1, 0.07), atol=1e-5, rtol=1e-5)
    # a 2-D student input means one view
    torch.testing.assert_close(crit(s[0], t, 0.04), _hand(s[:1], t, crit.center, 0.1, 0.04), atol=1e-5, rtol=1e-5)


def test_gradient_reaches_student_only():
    crit = DINOLoss(out_dim=6)
    s = torch.randn(2, 3, 6, requires_grad=True)
    t = torch.randn(3, 6, requires_grad=True)
    crit(s, t, 0.04).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_center_update_momentum_values():
    crit = DINOLoss(out_dim=3, center_momentum=0.9)
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])   # mean [2, 2, 2]
    crit.update_center(t1)
    torch.testing.assert_close(crit.center, torch.tensor([[0.2, 0.2, 0.2]]))
    t2 = torch.tensor([[10.0, 0.0, -10.0]])
    crit.update_center(t2)
    torch.testing.assert_close(crit.center, torch.tensor([[0.9 * 0.2 + 1.0, 0.18, 0.18 - 1.0]]))
    crit.update_center(torch.zeros(2, 5, 3))  # any leading dims
    torch.testing.assert_close(crit.center, 0.9 * torch.tensor([[1.18, 0.18, -0.82]]))


def test_fp32_under_bf16_autocast_and_shape_errors():
    crit = DINOLoss(out_dim=8)
    s, t = torch.randn(2, 4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(s, t, 0.04)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, crit(s.float(), t.float(), 0.04))
    with pytest.raises(ValueError):
        crit(torch.randn(2, 5, 8), torch.randn(4, 8), 0.04)
