"""Explainer API behaviour: a hand-checked model, side effects, errors, determinism, display helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medvit_explain.errors import MethodError, ModelNotSupportedError, TargetError
from medvit_explain.explainers import ImageShapeError, explain, normalize_for_display, upsample
from medvit_explain.registry import explainer_class, method_names
from tests.vit_models import TinyViTClassifier, make_images, make_model

FAST = {
    "cdam-smooth": {"n_samples": 2},
    "cdam-integrated": {"n_steps": 3},
    "ig": {"n_steps": 3},
    "smoothgrad": {"n_samples": 2},
}
ALL_METHODS = method_names()


# ------------------------------------------------------------------------------ hand-built model


def hand_built_model() -> TinyViTClassifier:
    """One block, D = 4, 2 heads, 16×16 image, 8×8 patches (2×2 grid, 5 tokens).

    Patch token j = m_j·(1, −1, 0, 0) with m_j the patch mean; class token and position embedding 0.
    W_q = W_k = 0 → uniform attention 1/5 (scores 0); W_v = proj = I; MLP output 0; final norm removed;
    head rows w_0 = e_0, w_1 = e_1. So f_c = w_c·(x_cls + mean_j T_j), T_j = LayerNorm(token j).
    """
    m = TinyViTClassifier(targets=["a", "b"], img_size=16, embed_dim=4, depth=1, num_heads=2)
    bb = m.backbone
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        w = torch.zeros(4, 1, 8, 8)
        w[0], w[1] = 1 / 64, -1 / 64
        bb.patch_embed.proj.weight.copy_(w)
        blk = bb.blocks[0]
        blk.norm1.weight.fill_(1.0)
        blk.norm2.weight.fill_(1.0)
        blk.attn.qkv.weight[8:12].copy_(torch.eye(4))  # v = T
        blk.attn.proj.weight.copy_(torch.eye(4))
        m.head.weight.copy_(torch.eye(4)[:2])
    bb.norm = nn.Identity()
    return m


def checkerboard() -> torch.Tensor:
    x = torch.ones(1, 1, 16, 16)
    x[..., :8, 8:] = -2.0
    x[..., 8:, :8] = -0.5
    return x  # patch means (+1, −2; −0.5, +1)


def test_hand_built_cdam_and_agcam_have_the_closed_form():
    m, x = hand_built_model(), checkerboard()
    means = torch.tensor([[1.0, -2.0], [-0.5, 1.0]])
    sign = means.sign()
    eps = m.backbone.blocks[0].norm1.eps
    # T_j = LayerNorm(m_j (1, −1, 0, 0)) = sign_j (1, −1, 0, 0) · t0_j, t0_j = |m_j| / sqrt(m_j²/2 + eps)
    t0 = means.abs() / (means**2 / 2 + eps).sqrt()
    # ∂f_c/∂T_j = w_c / 5, so S_j,c = T_j·w_c / 5: +t0/5·sign for "a", −t0/5·sign for "b"
    cdam = explain(m, x, "cdam")
    torch.testing.assert_close(cdam[0, 0], sign * t0 / 5, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cdam[0, 1], -sign * t0 / 5, rtol=1e-6, atol=1e-7)
    # AG-CAM: α_h[j] = (∂f/∂o_h)·v_h,j = w_c[head h]·T_j[head h]; only head 0 is non-zero;
    # sigmoid(S) = sigmoid(0) = 1/2 → L_j = ReLU(±t0)/2
    agcam = explain(m, x, "agcam")
    torch.testing.assert_close(agcam[0, 0], (sign > 0) * t0 / 2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(agcam[0, 1], (sign < 0) * t0 / 2, rtol=1e-6, atol=1e-7)
    # attention: uniform over 5 tokens → 1/5 everywhere
    torch.testing.assert_close(explain(m, x, "attention", targets="a")[0, 0], torch.full((2, 2), 0.2))


# ------------------------------------------------------------------------------------ side effects


def _all_hooks_empty(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks
        and not m._forward_pre_hooks
        and not m._backward_hooks
        and not getattr(m, "_backward_pre_hooks", {})
        for m in model.modules()
    )


class _Boom(RuntimeError):
    pass


class _RaisingHead(nn.Module):
    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise _Boom("head failed")
        return self.inner(x)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_no_state_left_after_an_exception_inside_the_call(method):
    m = make_model("reg4")
    if not explainer_class(method).class_sensitive:  # these never call the head: raise inside a block instead
        m.backbone.blocks[-1].mlp.fc1.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(_Boom()))
        own = 1
    else:
        m.head = _RaisingHead(m.head, after=0)
        own = 0
    m.train()
    frozen = m.backbone.blocks[0].attn.qkv.weight
    frozen.requires_grad_(False)
    m.backbone.blocks[0].attn.fused_attn = True
    m.backbone.blocks[1].attn.fused_attn = False
    with pytest.raises(_Boom):
        explain(m, make_images(m, 2), method, **FAST.get(method, {}))
    assert sum(len(x._forward_pre_hooks) for x in m.modules()) == own
    if own:
        m.backbone.blocks[-1].mlp.fc1._forward_pre_hooks.clear()
    assert _all_hooks_empty(m)
    assert all(x.training for x in m.modules())
    assert not frozen.requires_grad and all(p.requires_grad for p in m.parameters() if p is not frozen)
    assert m.backbone.blocks[0].attn.fused_attn is True and m.backbone.blocks[1].attn.fused_attn is False


@pytest.mark.parametrize("method", ALL_METHODS)
def test_no_side_effects_deterministic_and_works_under_no_grad(method):
    m = make_model("plain")
    x = make_images(m, 2)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    a = explain(m, x, method, **FAST.get(method, {}))
    with torch.no_grad():
        b = explain(m, x, method, **FAST.get(method, {}))
    assert torch.equal(a, b)
    assert not a.requires_grad and a.dtype == torch.float32
    assert _all_hooks_empty(m)
    assert all(p.grad is None for p in m.parameters())
    assert all(x.training for x in m.modules())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert torch.is_grad_enabled()


def test_agcam_and_cdam_with_frozen_weights_and_fused_attention():
    m = make_model("qknorm-layerscale-mlphead")
    x = make_images(m, 3)
    want = {meth: explain(m, x, meth) for meth in ("agcam", "cdam", "chefer")}
    for p in m.parameters():
        p.requires_grad_(False)
    for blk in m.backbone.blocks:
        blk.attn.fused_attn = True
    for meth, w in want.items():
        got = explain(m, x, meth)
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
    assert not any(p.requires_grad for p in m.parameters())
    assert all(blk.attn.fused_attn for blk in m.backbone.blocks)


@pytest.mark.parametrize("method", ["cdam", "agcam", "cdam-smooth"])
def test_batch_equals_images_one_at_a_time(method):
    m = make_model("nonsquare")
    x = make_images(m, 3)
    opts = {"noise_level": 0.0, "n_samples": 2} if method == "cdam-smooth" else {}
    whole = explain(m, x, method, targets=["subtlety", "malignancy"], **opts)
    for b in range(3):
        one = explain(m, x[b : b + 1], method, targets=["subtlety", "malignancy"], **opts)
        torch.testing.assert_close(whole[b : b + 1], one, rtol=1e-5, atol=1e-6 * float(one.abs().max()))


def test_seed_changes_stochastic_maps_and_chunking_does_not():
    m = make_model("plain")
    x = make_images(m, 2)
    a = explain(m, x, "cdam-smooth", n_samples=4, seed=1)
    b = explain(m, x, "cdam-smooth", n_samples=4, seed=2)
    c = explain(m, x, "cdam-smooth", n_samples=4, seed=1, internal_batch_size=2)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_target_order_and_names():
    m = make_model("plain")
    x = make_images(m, 2)
    full = explain(m, x, "cdam")
    sub = explain(m, x, "cdam", targets=["calcification", "malignancy"])
    torch.testing.assert_close(sub, full[:, [2, 0]])
    torch.testing.assert_close(explain(m, x, "cdam", targets=1), full[:, 1:2])


# ----------------------------------------------------------------------------------------- errors


def test_unknown_method_lists_valid_names():
    m = make_model("plain")
    with pytest.raises(MethodError, match="cdam.*agcam"):
        explain(m, make_images(m, 1), "gradcam++")


def test_unknown_option_is_a_method_error():
    m = make_model("plain")
    with pytest.raises(MethodError, match="n_samples"):
        explain(m, make_images(m, 1), "cdam", n_samples=3)
    with pytest.raises(MethodError, match="expected"):
        explain(m, make_images(m, 1), "cdam-smooth", n_samples=0)


@pytest.mark.parametrize("targets", ["spiculation", 3, [0, "nope"], [], True])
def test_unknown_target_lists_valid_names(targets):
    m = make_model("plain")
    with pytest.raises(TargetError, match="malignancy"):
        explain(m, make_images(m, 1), "cdam", targets=targets)


@pytest.mark.parametrize("shape", [(1, 32, 32), (2, 3, 32, 32), (2, 1, 32, 48), (1, 1, 1, 32, 32)])
def test_wrong_image_shape_says_expected_and_got(shape):
    m = make_model("plain")
    with pytest.raises(ImageShapeError, match="expected.*got") as info:
        explain(m, torch.zeros(shape), "cdam")
    assert isinstance(info.value, ValueError)


def test_unsupported_models():
    with pytest.raises(ModelNotSupportedError, match="backbone"):
        explain(nn.Linear(2, 2), torch.zeros(1, 1, 32, 32), "cdam")
    m = make_model("plain")
    m.backbone.cls_token = None
    with pytest.raises(ModelNotSupportedError, match="class token"):
        explain(m, make_images(m, 1), "agcam")


# ---------------------------------------------------------------------------------------- display


def test_upsample_shapes_and_modes():
    maps = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    up = upsample(maps, (32, 48))
    assert up.shape == (2, 3, 32, 48)
    near = upsample(maps, (8, 12), mode="nearest")
    assert torch.equal(near[..., ::2, ::2], maps)
    with pytest.raises(ValueError, match="expected"):
        upsample(maps, (8, 8), mode="cubic")


def test_normalize_for_display_per_map_and_constant_maps():
    maps = torch.randn(2, 3, 4, 4)
    maps[1, 2] = 7.0
    out = normalize_for_display(maps)
    assert not torch.isnan(out).any()
    assert torch.equal(out[1, 2], torch.zeros(4, 4))
    flat = out[0].flatten(1)
    torch.testing.assert_close(flat.amin(1), torch.zeros(3))
    torch.testing.assert_close(flat.amax(1), torch.ones(3), rtol=0, atol=1e-6)
