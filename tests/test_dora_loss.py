"""dora_loss: vectorised == per-frame/per-object loop oracle, compat == reference quirks, trains."""

import copy

import pytest
import torch
import torch.nn.functional as F

from wtours.models.heads import DINOHead
from wtours.models.vit import TrackingViT
from wtours.objectives.dora import compat_object_weights, dora_loss


def _h(q, s, tau_s):
    """Batch-mean cross-entropy of one (teacher, student view) pair: q [B, C], s [B, C]."""
    return torch.sum(-q * F.log_softmax(s / tau_s, dim=-1), dim=-1).mean()


def dora_loss_reference_loop(student_local, student_masked, teacher, center, tau_s=0.1, tau_t=0.04,
                             compat_reference=False):
    """Test oracle: plain loops over objects, frames and crops (dora.md §3.1)."""
    B, T, V, C = student_local.shape
    k = student_masked.shape[2]
    if not compat_reference:
        total = 0.0
        for t in range(T):
            q = F.softmax((teacher[:, t] - center) / tau_t, dim=-1)
            mask = sum(_h(q, student_masked[:, t, j], tau_s) for j in range(k)) / k
            local = sum(_h(q, student_local[:, t, v], tau_s) for v in range(V)) / V
            total += 0.5 * mask + 0.5 * local
        return total / T
    # Reference layout: per frame, local crops concatenated crop-major along the batch
    # ([T, V*B, C], chunked into V pieces), the teacher chunked into 1 global crop.
    local_tb = student_local.permute(1, 2, 0, 3).reshape(T, V * B, C)
    frame_loss = 0.0          # <- initialised once, never reset per object (reference bug 2)
    total_loss = 0.0
    for j in range(k):
        for cnt in range(T):
            s_loc = (local_tb[cnt] / tau_s).chunk(V)
            s_msk = (student_masked[:, cnt, j] / tau_s).chunk(1)
            q_all = F.softmax((teacher[:, cnt] - center) / tau_t, dim=-1).chunk(1)
            mask_loss, n_terms = 0.0, 0
            for iq, q in enumerate(q_all):
                for v in range(len(s_msk)):
                    mask_loss += torch.sum(-q * F.log_softmax(s_msk[v], dim=-1), dim=-1).mean()
                    n_terms += 1
            mask_loss /= n_terms
            local_loss, n_terms = 0.0, 0
            for iq, q in enumerate(q_all):
                for v in range(len(s_loc)):
                    if v == iq:   # reference bug 1: skips local crop 0
                        continue
                    local_loss += torch.sum(-q * F.log_softmax(s_loc[v], dim=-1), dim=-1).mean()
                    n_terms += 1
            local_loss /= n_terms
            frame_loss += (mask_loss + local_loss) * 0.5
        frame_loss /= T
        total_loss += frame_loss
    return total_loss / k


def _inputs(B=3, T=4, V=3, k=3, C=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, V, C, generator=g) * 2, torch.randn(B, T, k, C, generator=g) * 2,
            torch.randn(B, T, C, generator=g), torch.randn(1, C, generator=g) * 0.5)


@pytest.mark.parametrize("shape", [(3, 4, 3, 3), (2, 8, 6, 3), (1, 1, 2, 1), (2, 3, 1, 5)])
def test_fixed_loss_equals_loop_oracle(shape):
    B, T, V, k = shape
    loc, msk, tea, c = _inputs(B, T, V, k)
    got = dora_loss(loc, msk, tea, c, 0.1, 0.04)
    assert got.shape == () and got.dtype == torch.float32
    torch.testing.assert_close(got, dora_loss_reference_loop(loc, msk, tea, c), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 3, 3), (2, 8, 6, 3), (2, 2, 2, 1), (1, 3, 4, 5)])
def test_compat_loss_equals_reference_formula(shape):
    B, T, V, k = shape
    loc, msk, tea, c = _inputs(B, T, V, k, seed=1)
    got = dora_loss(loc, msk, tea, c, 0.1, 0.04, compat_reference=True)
    want = dora_loss_reference_loop(loc, msk, tea, c, compat_reference=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compat_and_fixed_differ_and_the_bugs_show():
    loc, msk, tea, c = _inputs(2, 8, 6, 3, seed=2)
    fixed = dora_loss(loc, msk, tea, c)
    compat = dora_loss(loc, msk, tea, c, compat_reference=True)
    assert not torch.allclose(fixed, compat, rtol=1e-3)
    # bug 1: compat ignores local crop 0 entirely, the fixed loss does not
    loc2 = loc.clone()
    loc2[:, :, 0] = torch.randn_like(loc2[:, :, 0]) * 5
    assert torch.equal(dora_loss(loc2, msk, tea, c, compat_reference=True), compat)
    assert not torch.allclose(dora_loss(loc2, msk, tea, c), fixed)
    # bug 2: with identical terms everywhere the never-reset accumulator inflates the loss
    same = torch.zeros(2, 8, 6, 5)
    ratio = dora_loss(same, same[:, :, :3], same[:, :, 0], torch.zeros(1, 5), compat_reference=True) / \
        dora_loss(same, same[:, :, :3], same[:, :, 0], torch.zeros(1, 5))
    assert ratio.item() == pytest.approx(compat_object_weights(3, 8).sum().item() * 8 / 3)
    assert ratio.item() == pytest.approx(1.089, abs=1e-3)   # dora.md §3.1: x1.089 for T=8, k=3


def test_compat_weights_closed_form():
    w = compat_object_weights(3, 8)
    torch.testing.assert_close(w, torch.tensor([1 / 8 + 1 / 64 + 1 / 512, 1 / 8 + 1 / 64, 1 / 8]))
    torch.testing.assert_close(compat_object_weights(2, 1), torch.tensor([2.0, 1.0]))


def test_gradients_and_autocast():
    loc, msk, tea, c = _inputs(2, 3, 2, 3, seed=3)
    loc.requires_grad_(True)
    msk.requires_grad_(True)
    tea.requires_grad_(True)
    dora_loss(loc, msk, tea, c).backward()
    assert loc.grad.abs().sum() > 0 and msk.grad.abs().sum() > 0 and tea.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dora_loss(loc.detach().bfloat16(), msk.detach().bfloat16(), tea.detach().bfloat16(), c)
    assert out.dtype == torch.float32


def test_shape_errors():
    loc, msk, tea, c = _inputs(2, 3, 2, 3)
    with pytest.raises(ValueError):
        dora_loss(loc[:, :2], msk, tea, c)
    with pytest.raises(ValueError):
        dora_loss(loc, msk[..., :5], tea, c)
    with pytest.raises(ValueError):
        dora_loss(loc[:, :, :1], msk, tea, c, compat_reference=True)


def test_a_few_optimizer_steps_lower_the_loss():
    torch.manual_seed(0)
    B, T, V, k, C = 2, 2, 2, 2, 32
    backbone = TrackingViT("vit_tiny_patch16_224", depth=1, embed_dim=24, num_heads=2)
    student = torch.nn.Sequential(backbone, DINOHead(24, out_dim=C, hidden_dim=32, bottleneck_dim=16))
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    glob = torch.randn(B * T, 3, 32, 32, generator=g)
    local = torch.randn(B * T * V, 3, 16, 16, generator=g)
    masked = glob.unsqueeze(1) * (torch.rand(B * T, k, 1, 32, 32, generator=g) > 0.5)
    center = torch.zeros(1, C)
    with torch.no_grad():
        tgt = teacher(glob).view(B, T, C)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)

    def loss_fn():
        s_loc = student(local).view(B, T, V, C)
        s_msk = student(masked.flatten(0, 1)).view(B, T, k, C)
        return dora_loss(s_loc, s_msk, tgt, center, 0.1, 0.04)

    losses = []
    for _ in range(8):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = loss_fn().item()
    assert final < losses[0] - 0.05 * abs(losses[0]), (losses, final)


def test_full_view_joins_the_global_half_as_one_more_view():
    s_loc, s_msk, t, c = _inputs(B=2, T=3, V=2, k=3, C=7)
    g = torch.Generator().manual_seed(5)
    s_full = torch.randn(2, 3, 7, generator=g)
    q = F.softmax((t - c) / 0.04, dim=-1)
    q_next = q.roll(-1, dims=1)
    got = dora_loss(s_loc, s_msk, t, c, targets=q, student_full=s_full, full_targets=q_next, full_weight=0.3)
    total = 0.0
    for fr in range(3):
        glob = (0.7 * sum(_h(q[:, fr], s_msk[:, fr, j], 0.1) for j in range(3)) / 3
                + 0.3 * _h(q_next[:, fr], s_full[:, fr], 0.1))
        loc = sum(_h(q[:, fr], s_loc[:, fr, v], 0.1) for v in range(2)) / 2
        total += 0.5 * glob + 0.5 * loc
    torch.testing.assert_close(got, total / 3, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        dora_loss(s_loc, s_msk, t, c, targets=q, student_full=s_full, full_targets=q_next, compat_reference=True)
    with pytest.raises(ValueError):
        dora_loss(s_loc, s_msk, t, c, targets=q, student_full=s_full[:, :2], full_targets=q_next[:, :2])
