"""TimeT (wtours.objectives.timet): feature forwarder, targets, loss, EMA."""

from __future__ import annotations

import copy
import queue

import pytest
import torch
import torch.nn.functional as F

from wtours.objectives.timet import (
    TimeTHead,
    context_frames,
    forward_labels,
    timet_ema_update_,
    timet_loss,
    timet_targets,
    window_mask,
)


def _reference_propagate(maps0, feats, h, w, n_last, radius, topk):
    """Per-clip transcription of the reference ``mask_propagation.propagate_labels`` /
    ``label_propagation`` (float64 maps, a queue of the n_last previous propagated frames,
    exp(cos/0.1) x 0/1 window, top-k threshold over all context patches, column normalisation)."""
    T, N, D = feats.shape
    mask = torch.zeros(h, w, h, w)
    for i in range(h):
        for j in range(w):
            for p in range(2 * radius + 1):
                for q in range(2 * radius + 1):
                    y, x = i - radius + p, j - radius + q
                    if 0 <= y < h and 0 <= x < w:
                        mask[i, j, y, x] = 1
    mask = mask.reshape(N, N)
    first_feat = feats[0].T                                   # D x N
    first_seg = maps0.double()                                # C x N
    que: queue.Queue = queue.Queue(n_last)
    out = [first_seg]
    for cnt in range(1, T):
        ctx_feats = [first_feat] + [f for f, _ in list(que.queue)]
        ctx_segs = [first_seg] + [s for _, s in list(que.queue)]
        tar = F.normalize(feats[cnt], dim=1)                  # N x D
        src = F.normalize(torch.stack(ctx_feats), dim=1)      # ctx x D x N
        aff = torch.exp(torch.bmm(tar.unsqueeze(0).repeat(len(ctx_feats), 1, 1), src) / 0.1)  # ctx x N(tar) x N(src)
        aff = aff * mask.unsqueeze(0)
        aff = aff.transpose(2, 1).reshape(-1, N)              # ctx*N (src) x N (tar)
        tk, _ = torch.topk(aff, dim=0, k=topk)
        thr, _ = torch.min(tk, dim=0)
        aff[aff < thr] = 0
        aff = aff / aff.sum(0, keepdim=True)
        segs = torch.stack(ctx_segs)                           # ctx x C x N
        segs = segs.transpose(2, 1).reshape(-1, segs.shape[1]).T   # C x ctx*N
        seg = segs.double() @ aff.double()                     # C x N
        if que.qsize() == n_last:
            que.get()
        que.put([feats[cnt].T, seg])
        out.append(seg)
    return torch.stack(out)                                    # T x C x N


@pytest.mark.parametrize("T,n_last,radius,topk", [(4, 7, 6, 5), (6, 2, 1, 3), (5, 3, 0, 5)])
def test_batched_forwarder_equals_the_reference_loop(T, n_last, radius, topk):
    g = torch.Generator().manual_seed(T + n_last)
    B, h, w, D, C = 3, 5, 6, 16, 7
    feats = torch.randn(B, T, h * w, D, generator=g)
    maps0 = torch.softmax(torch.randn(B, C, h * w, generator=g) * 3, dim=1)
    ours = forward_labels(maps0, feats, (h, w), n_last=n_last, radius=radius if radius else 0, topk=topk)
    ref = torch.stack([_reference_propagate(maps0[b], feats[b], h, w, n_last, radius if radius else max(h, w), topk)
                       for b in range(B)])
    assert ours.shape == (B, T, C, h * w) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.sum(2), torch.ones(B, T, h * w), atol=1e-5, rtol=0)  # convex combinations


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    feats, maps0 = torch.randn(5, 4, 12, 8, generator=g), torch.softmax(torch.randn(5, 3, 12, generator=g), 1)
    a = forward_labels(maps0, feats, (3, 4))
    b = forward_labels(maps0, feats, (3, 4), max_elements=1)  # one clip per chunk
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dy,dx", [(0, 1), (1, 0), (1, -1)])
def test_forwarder_moves_labels_with_an_integer_translation(dy, dx):
    """Frame t shows the world shifted by t*(dy, dx) patches: the labels must move exactly with it."""
    h, w, T, D = 8, 9, 4, 64
    g = torch.Generator().manual_seed(0)
    world = F.normalize(torch.randn(h + 3 * T, w + 3 * T, D, generator=g), dim=-1)  # distinct features per place
    labels_world = torch.randint(0, 5, (h + 3 * T, w + 3 * T), generator=g)
    oy, ox = T, T  # frame origin in the world, so shifts stay inside it
    feats = torch.stack([world[oy + t * dy: oy + t * dy + h, ox + t * dx: ox + t * dx + w].reshape(h * w, D)
                         for t in range(T)])[None]
    lab0 = labels_world[oy:oy + h, ox:ox + w].reshape(-1)
    maps0 = F.one_hot(lab0, 5).T.float()[None]
    maps = forward_labels(maps0, feats, (h, w), n_last=7, radius=6, topk=1)
    for t in range(1, T):
        truth = labels_world[oy + t * dy: oy + t * dy + h, ox + t * dx: ox + t * dx + w]
        # patches whose place was visible in frame 0 have an exact source
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        seen = (ys + t * dy >= 0) & (ys + t * dy < h) & (xs + t * dx >= 0) & (xs + t * dx < w)
        got = maps[0, t].argmax(0).reshape(h, w)
        assert torch.equal(got[seen], truth[seen])
        assert torch.allclose(maps[0, t].max(0).values.reshape(h, w)[seen], torch.ones(int(seen.sum())))


def test_context_and_window_masks():
    c = context_frames(6, 2)
    assert c[0].sum() == 0                                        # frame 0 is the source
    assert c[1].tolist() == [True, False, False, False, False, False]
    assert c[5].tolist() == [True, False, False, True, True, False]  # frame 0 + the 2 before
    m = window_mask(3, 4, 1)
    assert m.shape == (12, 12) and m[0, 5] and not m[0, 2] and m[5, 0] and m.equal(m.T)


def test_targets_are_sinkhorn_equipartition_of_first_frame_patches():
    g = torch.Generator().manual_seed(2)
    s = F.normalize(torch.randn(4, 30, 256, generator=g), dim=-1) @ F.normalize(torch.randn(10, 256, generator=g), dim=-1).T
    q = timet_targets(s, eps=0.05, iters=200)
    assert q.shape == (4, 10, 30)
    torch.testing.assert_close(q.sum(1), torch.ones(4, 30), atol=1e-5, rtol=0)         # every patch: a distribution
    torch.testing.assert_close(q.sum((0, 2)), torch.full((10,), 120 / 10), atol=1e-2, rtol=0)  # equal shares


def test_loss_equals_a_per_clip_formulation():
    g = torch.Generator().manual_seed(3)
    B, T, N, K = 3, 4, 10, 6
    scores = torch.randn(B, T, N, K, generator=g, requires_grad=True)
    maps = torch.softmax(torch.randn(B, T, K, N, generator=g), 2)
    for frames in ("last", "all"):
        per_clip = []
        for b in range(B):
            ts = [T - 1] if frames == "last" else list(range(1, T))
            per_clip.append(torch.stack([F.cross_entropy(scores[b, t] / 0.1, maps[b, t].argmax(0)) for t in ts]).mean())
        torch.testing.assert_close(timet_loss(scores, maps, 0.1, frames), torch.stack(per_clip).mean())
    timet_loss(scores, maps).backward()
    assert scores.grad is not None and scores.grad[:, 0].abs().sum() == 0  # frame 0 is never a target


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        timet_loss(torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError):
        timet_loss(torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 4, 5))


def test_head_shapes_and_unit_prototypes():
    head = TimeTHead(48, hidden=(32, 32), out_dim=16, prototypes=12)
    s = head.scores(torch.randn(2, 7, 48))
    assert s.shape == (2, 7, 12) and s.abs().max() <= 1 + 1e-5
    with torch.no_grad():
        head.prototypes.mul_(3.0)
    head.renormalize_()
    torch.testing.assert_close(head.prototypes.norm(dim=-1), torch.ones(12))
    assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 3 and sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2


def test_ema_is_real_and_compat_reproduces_the_swapped_reference():
    torch.manual_seed(0)
    student = TimeTHead(8, hidden=(8,), out_dim=4, prototypes=3)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    t_real, t_ref = copy.deepcopy(teacher), copy.deepcopy(teacher)
    timet_ema_update_(t_real, student, 0.99)
    timet_ema_update_(t_ref, student, 0.99, compat_reference=True)
    w_t, w_s = teacher.mlp[0].weight, student.mlp[0].weight
    torch.testing.assert_close(t_real.mlp[0].weight, 0.99 * w_t + 0.01 * w_s)      # a real EMA: stays near the teacher
    torch.testing.assert_close(t_ref.mlp[0].weight, 0.01 * w_t + 0.99 * w_s)       # the reference: near the student
    torch.testing.assert_close(t_real.prototypes.norm(dim=-1), torch.ones(3))        # renormalised after the update
