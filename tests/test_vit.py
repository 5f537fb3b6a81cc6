"""TrackingViT: timm-equal outputs, last-block q/k and [CLS] attention row, any input size."""

import pytest
import torch

from wtours.errors import UserError
from wtours.models.vit import TrackingOutput, TrackingViT

TINY = dict(depth=2, embed_dim=48, num_heads=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = TrackingViT("vit_tiny_patch16_224", img_size=224, **TINY).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine so that a missing norm would show
        for mod in m.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    return m


def _last_block_input(m, x):
    seen = {}
    h = m.vit.blocks[-1].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    try:
        m.vit.forward_features(x)
    finally:
        h.remove()
    return seen["x"]


def test_attributes(model):
    assert (model.arch, model.embed_dim, model.num_heads, model.head_dim, model.patch_size) == \
        ("vit_tiny_patch16_224", 48, 3, 16, 16)
    assert all(blk.attn.fused_attn for blk in model.vit.blocks)
    assert model.vit.num_classes == 0


@pytest.mark.parametrize("size", [224, 112, 96])
def test_forward_and_tracking_equal_timm_forward_features(model, size):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.vit.forward_features(x)
        out = model.forward_tracking(x)
        cls = model(x)
    n = (size // 16) ** 2
    assert isinstance(out, TrackingOutput)
    assert cls.shape == (2, 48) and out.patches.shape == (2, n, 48)
    torch.testing.assert_close(cls, feats[:, 0])
    torch.testing.assert_close(out.cls, feats[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.patches, feats[:, 1:], atol=1e-5, rtol=1e-5)


def test_q_k_and_cls_attention_match_a_hand_computation(model):
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = model.forward_tracking(x)
        xin = _last_block_input(model, x)
        attn = model.vit.blocks[-1].attn
        qkv = attn.qkv(model.vit.blocks[-1].norm1(xin)).reshape(2, 50, 3, 3, 16).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        full = ((q * 16 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)  # [B, h, N+1, N+1], test only
    assert out.q.shape == out.k.shape == (2, 3, 49, 16)
    assert out.q_cls.shape == (2, 3, 16) and out.cls_attn.shape == (2, 3, 49)
    torch.testing.assert_close(out.q, q[:, :, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.k, k[:, :, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.q_cls, q[:, :, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_attn, full[:, :, 0, 1:], atol=1e-6, rtol=1e-5)
    sums = out.cls_attn.sum(-1)
    assert (sums < 1).all() and (sums > 0).all()  # the [CLS]->[CLS] weight is left out


def test_tracking_under_bf16_autocast_keeps_fp32_attention_row(model):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_tracking(x)
    assert out.cls_attn.dtype == torch.float32
    with torch.no_grad():
        ref = model.forward_tracking(x)
    torch.testing.assert_close(out.cls_attn, ref.cls_attn, atol=0.05, rtol=0.1)


def test_gradient_flows_in_forward():
    torch.manual_seed(1)
    m = TrackingViT("vit_tiny_patch16_224", drop_path_rate=0.1, **TINY).train()
    m(torch.randn(2, 3, 112, 112)).square().sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["vit.patch_embed.proj.weight"].abs().sum() > 0
    assert grads["vit.blocks.0.attn.qkv.weight"].abs().sum() > 0


def test_state_dict_is_timms():
    m = TrackingViT("vit_tiny_patch16_224", **TINY)
    assert "patch_embed.proj.weight" in m.vit.state_dict()
    assert all(k.startswith("vit.") for k in m.state_dict())


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError):
        TrackingViT("vit_not_a_model")


def _dino_interpolate_pos_encoding(pos_embed, x_shape, patch):
    """DINO's ``VisionTransformer.interpolate_pos_encoding`` (facebookresearch/dino, also DoRA's), transcribed:
    ``B, nc, w, h = x.shape`` (so its "w" is the height), +0.1, scale_factor, bicubic, square source grid."""
    import math

    _, _, w, h = x_shape
    n = pos_embed.shape[1] - 1
    cls_pe, patch_pe = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pe = torch.nn.functional.interpolate(
        patch_pe.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    assert int(w0) == patch_pe.shape[-2] and int(h0) == patch_pe.shape[-1]
    patch_pe = patch_pe.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((cls_pe.unsqueeze(0), patch_pe), dim=1)


def _tokens_after_pos_embed(m, x):
    v = m.vit
    return v._pos_embed(v.patch_embed(x))


@pytest.mark.parametrize("hw", [(112, 112), (96, 96), (112, 64)])
def test_local_crops_interpolate_the_position_embedding_as_dino(hw):
    """Issue 12: timm resamples with antialias to the size, DINO with a scale factor and no antialias; the
    default is DINO's, exactly (a smooth embedding, as trained ones are, differs from timm's by several %)."""
    torch.manual_seed(0)
    m = TrackingViT("vit_tiny_patch16_224", img_size=224, **TINY).eval()
    timm_m = TrackingViT("vit_tiny_patch16_224", img_size=224, pos_interp="timm", **TINY).eval()
    with torch.no_grad():
        smooth = torch.nn.functional.interpolate(torch.randn(1, 48, 4, 4), size=(14, 14), mode="bicubic")
        m.vit.pos_embed[:, 1:] = smooth.permute(0, 2, 3, 1).reshape(1, 196, 48)
    timm_m.load_state_dict(m.state_dict())
    assert m.state_dict().keys() == timm_m.state_dict().keys()  # the state dict is timm's either way
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        patches = m.vit.patch_embed(x).flatten(1, 2)
        cls = m.vit.cls_token.expand(2, -1, -1)
        want = torch.cat([cls, patches], 1) + _dino_interpolate_pos_encoding(m.vit.pos_embed, x.shape, 16)
        got = _tokens_after_pos_embed(m, x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        other = _tokens_after_pos_embed(timm_m, x)
        pe_diff = (other - got).norm() / (want - torch.cat([cls, patches], 1)).norm()
        assert pe_diff > 0.03, float(pe_diff)  # timm's is another interpolation
        # forward_tracking and forward see the same tokens
        torch.testing.assert_close(m.forward_tracking(x).cls, m(x))
        full = torch.randn(1, 3, 224, 224)
        assert torch.equal(m.vit.forward_features(full), timm_m.vit.forward_features(full))  # native: untouched


def test_pos_interp_comes_from_the_config():
    from wtours.config import load_config
    from wtours.stages.video.config import VideoPretrainConfig
    from wtours.stages.video.module import VideoModule

    for choice in ("dino", "timm"):
        cfg = load_config(VideoPretrainConfig, "video/tiny", [f"model.pos_interp={choice}"])
        m = VideoModule(cfg)
        assert m.student.pos_interp == m.teacher.pos_interp == choice
    with pytest.raises(ValueError, match="pos_interp"):
        TrackingViT("vit_tiny_patch16_224", pos_interp="nearest", **TINY)
