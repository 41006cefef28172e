"""LeGrad and Grad-SAM against slow references written from the papers' equations, a hand-checked case,
the shipped sample model, and the state they leave behind.

The references run one image and one target at a time through the hand-written ViT forward of
``tests.test_explain_exactness`` (``ref``: explicit attention matrices, nothing of timm's but the stem),
take scalar ``torch.autograd.grad`` with respect to the materialised post-softmax attention maps and
reduce them with plain loops. Tolerance: max |got − ref| ≤ 1e-5 · max |ref| in float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medvit_explain.explainers import explain
from medvit_explain.registry import explainer_class, method_names
from tests.test_explain_api import _all_hooks_empty, _Boom, _RaisingHead, checkerboard, hand_built_model
from tests.test_explain_exactness import TARGET_SETS, assert_maps_close, idx, ref
from tests.vit_models import VARIANTS, make_images, make_model

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("legrad", "gradsam")

# ------------------------------------------------------------------ references (papers' equations)


def layer_outputs(model, x):
    """Hand-written forward of one image [1, C, H, W]: every block's output x_l and post-softmax A^l."""
    h = ref.stem(model.backbone, x)
    outs, mats = [], []
    for blk in model.backbone.blocks:
        h, _, a = ref.block(blk, h)
        outs.append(h)
        mats.append(a)
    return outs, mats


def legrad_reference(model, images, targets, concept=None):
    """E_c = Σ_l mean_{h, i} ReLU(∂s_l,c/∂A^l[h, i, :]) with s_l = head(pool(norm(x_l))), every query row i."""
    score = ref.score_fn(model, concept)

    def one(x, c):
        outs, mats = layer_outputs(model, x)
        total = 0
        for x_l, a_l in zip(outs, mats, strict=True):
            (g,) = torch.autograd.grad(score(ref.pooled(model.backbone, x_l), c), a_l, retain_graph=True)
            heads, rows = g.shape[1], g.shape[2]
            acc = torch.zeros(g.shape[-1])
            for h in range(heads):
                for i in range(rows):
                    acc += g[0, h, i].clamp_min(0)
            total = total + acc / (heads * rows)
        return ref.grid(model, total)

    return ref.per_image_target(one, images, targets)


def gradsam_reference(model, images, targets, concept=None):
    """L_c = 1/(L·H) Σ_l Σ_h ReLU(∂f_c/∂A^l_h[CLS, :]) ⊙ A^l_h[CLS, :], full gradient (nothing detached)."""
    score = ref.score_fn(model, concept)

    def one(x, c):
        outs, mats = layer_outputs(model, x)
        grads = torch.autograd.grad(score(ref.pooled(model.backbone, outs[-1]), c), mats)
        total, count = 0, 0
        for a, g in zip(mats, grads, strict=True):
            for h in range(a.shape[1]):
                total = total + g[0, h, 0].clamp_min(0) * a[0, h, 0]
                count += 1
        return ref.grid(model, total / count)

    return ref.per_image_target(one, images, targets)


REFERENCES = {"legrad": legrad_reference, "gradsam": gradsam_reference}

# ------------------------------------------------------------------ exactness on tiny ViTs


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request):
    return make_model(request.param)


@pytest.mark.parametrize("method", METHODS)
def test_matches_reference_on_every_tiny_vit(model, method):
    """plain, 4 register tokens, non-square 4×6 grid, distillation token, qk-norm + layer scale + MLP head,
    average pooling (LeGrad's all-rows path); 3 images, a target subset in a new order."""
    x = make_images(model, 3, seed=3)
    t = TARGET_SETS["subset"]
    assert_maps_close(explain(model, x, method, targets=t), REFERENCES[method](model, x, idx(t)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("variant", ["plain", "reg4"])
def test_matches_reference_single_image_all_targets(variant, method):
    m = make_model(variant)
    x = make_images(m, 1, seed=4)
    assert_maps_close(explain(m, x, method), REFERENCES[method](m, x, [0, 1, 2]))


@pytest.mark.parametrize("method", METHODS)
def test_concept_matches_reference(method):
    m = make_model("nonsquare")
    x, examples = make_images(m, 2), make_images(m, 3, seed=7)
    got = explain(m, x, method, concept=examples)
    assert got.shape == (2, 1, 4, 6)
    assert_maps_close(got, REFERENCES[method](m, x, [0], concept=ref.concept_vector(m, examples)))


def test_legrad_counts_every_query_row():
    """Class-token pooling: only the class row of ∂s_l/∂A^l is non-zero, yet the mean divides by all P+N
    rows (4 register tokens + 16 patches + the class token = 21), as the paper does."""
    m = make_model("reg4")
    x = make_images(m, 1)
    outs, mats = layer_outputs(m, x)
    (g,) = torch.autograd.grad(m.head(ref.pooled(m.backbone, outs[0]))[0, 1], mats[0])
    assert g[0, :, 1:].abs().max() == 0 and g[0, :, 0].abs().max() > 0
    assert mats[0].shape[-1] == 21


def test_hand_built_closed_form():
    """One block, 2 heads, 5 tokens, uniform attention (A = 1/5), final norm removed (tests.test_explain_api).

    ∂f_c/∂A_h[CLS, j] = w_c[head h]·T_j[head h]: only head 0 is non-zero, ±t0_j (T_j = sign_j (1, −1, 0, 0) t0_j).
    LeGrad: only the class row is non-zero; mean over 2 heads and 5 rows → ReLU(±t0)/10.
    Grad-SAM: mean over 2 heads of ReLU(±t0)·(1/5) → ReLU(±t0)/10 (= AG-CAM's ReLU(±t0)/2 divided by 5).
    """
    m = hand_built_model()
    x = checkerboard()
    means = torch.tensor([[1.0, -2.0], [-0.5, 1.0]])
    sign = means.sign()
    t0 = means.abs() / (means**2 / 2 + m.backbone.blocks[0].norm1.eps).sqrt()
    for method in METHODS:
        got = explain(m, x, method)
        torch.testing.assert_close(got[0, 0], (sign > 0) * t0 / 10, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[0, 1], (sign < 0) * t0 / 10, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(explain(m, x, "gradsam"), explain(m, x, "agcam") / 5, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ the shipped sample model


@pytest.fixture(scope="module")
def sample_model_and_slices():
    from medvit_explain import load_model
    from medvit_explain.io import load_volume
    from medvit_explain.prediction import model_inputs

    model = load_model(device="cpu")
    volume = load_volume(ROOT / "sample_data" / "phantom_001.nii.gz")
    return model, model_inputs(model, volume).images([12, 18, 24, 30]).as_subclass(torch.Tensor)


@pytest.mark.parametrize("method", METHODS)
def test_sample_model_batch_of_four_all_targets(sample_model_and_slices, method):
    model, x = sample_model_and_slices
    gh, gw = model.backbone.patch_embed.grid_size
    maps = explain(model, x, method)
    assert maps.shape == (4, 9, gh, gw) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all() and maps.amax() > 0
    flat = maps.flatten(2)
    for i in range(9):
        for j in range(i + 1, 9):
            assert not torch.allclose(flat[:, i], flat[:, j]), (model.targets[i], model.targets[j])


@pytest.mark.parametrize("method", METHODS)
def test_sample_model_matches_reference(sample_model_and_slices, method):
    model, x = sample_model_and_slices
    want = REFERENCES[method](model, x[:2], [5, 0, 6])
    assert_maps_close(explain(model, x[:2], method, targets=["spiculation", "malignancy", "diameter"]), want)


# ------------------------------------------------------------------ registry and state


def test_registered_with_metadata():
    for method in METHODS:
        cls = explainer_class(method)
        assert method in method_names()
        assert cls.class_sensitive and cls.kind == "attention-gradient" and cls.space == "token"
        assert cls.title and cls.citation and dict(cls.defaults) == {"concept": None}


@pytest.mark.parametrize("method", METHODS)
def test_frozen_weights_and_fused_attention_give_the_same_maps(method):
    m = make_model("qknorm-layerscale-mlphead")
    x = make_images(m, 3)
    for blk in m.backbone.blocks:
        blk.attn.fused_attn = False
    want = explain(m, x, method)
    for p in m.parameters():
        p.requires_grad_(False)
    for blk in m.backbone.blocks:
        blk.attn.fused_attn = True
    got = explain(m, x, method)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert all(blk.attn.fused_attn is True for blk in m.backbone.blocks)
    assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("where", ["head", "block"])
@pytest.mark.parametrize("method", METHODS)
def test_no_state_left_after_an_exception_inside_the_call(method, where):
    m = make_model("reg4")
    if where == "head":
        m.head = _RaisingHead(m.head, after=0)
    else:  # raises inside the capture's forward, while the taps are registered
        handle = m.backbone.blocks[1].mlp.fc1.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(_Boom()))
    m.train()
    frozen = m.backbone.blocks[0].attn.qkv.weight
    frozen.requires_grad_(False)
    m.backbone.blocks[0].attn.fused_attn = True
    m.backbone.blocks[1].attn.fused_attn = False
    third = m.backbone.blocks[2].attn.fused_attn
    with pytest.raises(_Boom):
        explain(m, make_images(m, 2), method)
    if where == "block":
        handle.remove()
    assert _all_hooks_empty(m)
    assert all(x.training for x in m.modules())
    assert not frozen.requires_grad and all(p.requires_grad for p in m.parameters() if p is not frozen)
    assert m.backbone.blocks[0].attn.fused_attn is True and m.backbone.blocks[1].attn.fused_attn is False
    assert m.backbone.blocks[2].attn.fused_attn is third
