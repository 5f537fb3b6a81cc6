"""Collapse monitors (wtours.objectives.collapse) on constructed inputs: uniform / one-hot targets, alike and
spread features, flat and steep teacher logits, rank-one and orthogonal bottlenecks, the head's g."""

import math

import torch

from wtours.models.heads import DINOHead
from wtours.objectives.collapse import HEAD_KEYS, collapse_stats, effective_rank, head_stats


def test_collapse_stats_uniform_and_one_hot_targets():
    C = 8
    uniform = torch.full((6, C), 1.0 / C)
    cls = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    s = collapse_stats(uniform, cls, torch.zeros(1, C))
    assert math.isclose(s["teacher_entropy"].item(), math.log(C), rel_tol=1e-5)
    assert math.isclose(s["teacher_batch_entropy"].item(), math.log(C), rel_tol=1e-5)
    one_hot = torch.eye(C)[:6]
    s = collapse_stats(one_hot, cls, torch.zeros(1, C))
    assert s["teacher_entropy"].item() < 1e-6
    assert s["prototypes_used"].item() == 6
    alike = collapse_stats(one_hot, cls[:1].expand(6, 16), torch.zeros(1, C))
    assert alike["feature_std"].item() < 1e-5


def test_effective_rank_rank_one_and_orthogonal():
    v = torch.randn(1, 12)
    assert math.isclose(effective_rank(v.expand(7, 12) * torch.arange(1, 8.0)[:, None]).item(), 1.0, rel_tol=1e-4)
    assert math.isclose(effective_rank(torch.eye(12)[:5] * 3.0).item(), 5.0, rel_tol=1e-4)
    two = torch.zeros(6, 12)
    two[:3, 0], two[3:, 1] = 1.0, 1.0
    assert math.isclose(effective_rank(two).item(), 2.0, rel_tol=1e-4)


def test_head_stats_values():
    C, tau = 4, 0.02
    rows = torch.tensor([[0.0, 0.1, 0.2, 0.3]])  # range 0.3 -> 15 in units of tau
    same = head_stats(rows.expand(5, C), tau, torch.randn(1, 6).expand(5, 6), torch.ones(C, 1),
                      torch.full((C, 1), 0.5))
    assert set(same) == set(HEAD_KEYS)
    assert math.isclose(same["teacher_logit_range"].item(), 15.0, rel_tol=1e-5)
    assert same["teacher_logit_spread"].item() < 1e-5           # every input gets the same logits
    assert math.isclose(same["bottleneck_rank"].item(), 1.0, rel_tol=1e-4)
    assert same["head_g"].item() == 1.0 and same["teacher_head_g"].item() == 0.5
    # two inputs whose logits differ by +-0.1 on every prototype: std over the batch 0.1 -> 5 tau
    two = torch.stack([rows[0] + 0.1, rows[0] - 0.1])
    s = head_stats(two.unflatten(0, (1, 2)), tau, torch.eye(6)[:2], torch.ones(C, 1), torch.ones(C, 1))
    assert math.isclose(s["teacher_logit_spread"].item(), 5.0, rel_tol=1e-5)
    assert math.isclose(s["bottleneck_rank"].item(), 2.0, rel_tol=1e-4)


def test_dino_head_bottleneck_and_prototypes_compose_to_forward():
    head = DINOHead(16, out_dim=10, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(5, 16)
    torch.testing.assert_close(head.prototypes(head.bottleneck(x)), head(x))
    assert head.g.shape == (10, 1) and torch.all(head.g == 1.0)
