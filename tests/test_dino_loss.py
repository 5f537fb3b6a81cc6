"""DINOLoss: targets x cross-entropy equal the hand-written formula; the centre (queue per micro-batch,
apply per optimizer step) is an EMA; fp32 under autocast."""

import torch
import torch.nn.functional as F

from wtours.objectives.dino import DINOLoss, cross_entropy


def _hand(student, teacher, center, tau_s, tau_t):
    q = F.softmax((teacher - center) / tau_t, dim=-1)
    total = 0.0
    for s in student:                       # S student views
        for i in range(teacher.shape[0]):   # M images
            total += -(q[i] * F.log_softmax(s[i] / tau_s, dim=-1)).sum()
    return total / (student.shape[0] * teacher.shape[0])


def _loss(crit, student, teacher, teacher_temp, student_temp=0.1):
    """What training computes per view (dora_loss): H(targets, student) averaged over views and rows."""
    return cross_entropy(crit.targets(teacher, teacher_temp).unsqueeze(0), student, student_temp).mean()


def test_equals_hand_formula_with_nonzero_center():
    g = torch.Generator().manual_seed(0)
    crit = DINOLoss(out_dim=11)
    crit.center.copy_(torch.randn(1, 11, generator=g))
    s, t = torch.randn(3, 4, 11, generator=g), torch.randn(4, 11, generator=g)
    torch.testing.assert_close(_loss(crit, s, t, 0.04), _hand(s, t, crit.center, 0.1, 0.04), atol=1e-5, rtol=1e-5)
    got_t = _loss(crit, s, t, torch.tensor(0.07))
    torch.testing.assert_close(got_t, _hand(s, t, crit.center, 0.1, 0.07), atol=1e-5, rtol=1e-5)
    # one view
    torch.testing.assert_close(_loss(crit, s[:1], t, 0.04), _hand(s[:1], t, crit.center, 0.1, 0.04),
                               atol=1e-5, rtol=1e-5)


def test_gradient_reaches_student_only():
    crit = DINOLoss(out_dim=6)
    s = torch.randn(2, 3, 6, requires_grad=True)
    t = torch.randn(3, 6, requires_grad=True)
    _loss(crit, s, t, 0.04).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_center_update_momentum_values():
    crit = DINOLoss(out_dim=3, center_momentum=0.9)
    crit.apply_center_update()  # nothing queued: nothing changes
    torch.testing.assert_close(crit.center, torch.zeros(1, 3))
    t1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])   # mean [2, 2, 2]
    crit.queue_center(t1)
    torch.testing.assert_close(crit.center, torch.zeros(1, 3))  # queued, not applied yet
    crit.apply_center_update()
    torch.testing.assert_close(crit.center, torch.tensor([[0.2, 0.2, 0.2]]))
    t2 = torch.tensor([[10.0, 0.0, -10.0]])
    crit.queue_center(t2)
    crit.apply_center_update()
    torch.testing.assert_close(crit.center, torch.tensor([[0.9 * 0.2 + 1.0, 0.18, 0.18 - 1.0]]))
    crit.queue_center(torch.zeros(2, 5, 3))  # any leading dims
    crit.apply_center_update()
    torch.testing.assert_close(crit.center, 0.9 * torch.tensor([[1.18, 0.18, -0.82]]))
    crit.apply_center_update()  # the queue was emptied: a second apply changes nothing
    torch.testing.assert_close(crit.center, 0.9 * torch.tensor([[1.18, 0.18, -0.82]]))


def test_accumulated_micro_batches_move_the_centre_once_by_their_mean():
    crit = DINOLoss(out_dim=2, center_momentum=0.5)
    crit.queue_center(torch.tensor([[2.0, 0.0], [4.0, 0.0]]))  # micro-batch 1: mean [3, 0]
    crit.queue_center(torch.tensor([[1.0, 6.0]]))              # micro-batch 2: mean [1, 6]
    crit.apply_center_update()                                  # one EMA step towards [2, 3]
    torch.testing.assert_close(crit.center, torch.tensor([[1.0, 1.5]]))
    assert list(crit.state_dict()) == ["center"]  # the centre is state (checkpointed); the queue is not


def test_fp32_under_bf16_autocast():
    crit = DINOLoss(out_dim=8)
    s, t = torch.randn(2, 4, 8).bfloat16(), torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(crit, s, t, 0.04)
        crit.queue_center(t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, _loss(crit, s.float(), t.float(), 0.04))
    crit.apply_center_update()
    assert crit.center.dtype == torch.float32
    torch.testing.assert_close(crit.center, 0.1 * t.float().mean(0, keepdim=True))


def test_sinkhorn_extra_rows_join_the_problem_and_are_dropped():
    g = torch.Generator().manual_seed(3)
    crit = DINOLoss(out_dim=6, centering="sinkhorn", sinkhorn_iters=3)
    t = torch.randn(2, 3, 6, generator=g)
    alone = crit.targets(t, 0.1)
    # the queue holding copies of the step's rows: same targets as the rows alone (rows scale alike)
    torch.testing.assert_close(crit.targets(t, 0.1, t.reshape(-1, 6).repeat(3, 1)), alone, atol=1e-5, rtol=1e-5)
    other = crit.targets(t, 0.1, torch.randn(10, 6, generator=g))
    assert other.shape == t.shape
    torch.testing.assert_close(other.sum(-1), torch.ones(2, 3))
    assert not torch.allclose(other, alone, atol=1e-3)
    # a queue of rows that all favour prototype 0 pushes the step's rows away from it
    crowd = torch.zeros(30, 6)
    crowd[:, 0] = 1.0
    assert crit.targets(t, 0.1, crowd)[..., 0].mean() < alone[..., 0].mean()
    torch.testing.assert_close(crit.targets(t, 0.1, torch.zeros(0, 6)), alone)
