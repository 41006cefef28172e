"""AttnLRP and Transformer Attribution against slow references written from the papers' equations.

The references re-run each ViT from its weights in float64, one image and one target at a time, attention
head by head with explicit matrices and LayerNorm written out, and propagate relevance layer by layer with
the rules applied by hand (explicit LRP: relevance tensors, never activation × gradient). Tolerance:
max |got − ref| ≤ 1e-5 · max |ref| with the method in float32 for AttnLRP; Transformer Attribution is
checked in float64 (≤ 1e-9) and, because the method itself amplifies rounding (see
test_transformer_attribution_conditioning), in float32 only to TA_FLOAT32_TOL.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from torch import nn

from medvit_explain.errors import ModelNotSupportedError
from medvit_explain.explainers import explain
from tests.vit_models import make_images, make_model

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
TA_FLOAT32_TOL = 2e-3
VARIANTS = ["plain", "reg4", "nonsquare", "qknorm-layerscale-mlphead", "distilled", "avgpool", "convstem"]

# ------------------------------------------------------------------------------------ explicit forward


def norm(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Identity):
        return x
    assert type(mod).__name__ == "LayerNorm", type(mod)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def linear(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x @ mod.weight.T + (0 if mod.bias is None else mod.bias)


def layer_scale(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x * mod.gamma if isinstance(mod, LayerScale) else x


def pool_rows(bb) -> list[int]:
    n = bb.num_prefix_tokens + bb.patch_embed.num_patches
    if getattr(bb, "dist_token", None) is not None:
        return [0, 1]
    return [0] if bb.global_pool == "token" else list(range(bb.num_prefix_tokens, n))


def head_layers(model) -> list[nn.Module]:
    return list(model.head) if isinstance(model.head, nn.Sequential) else [model.head]


def forward(model, img: torch.Tensor) -> dict:
    """One image [C, H, W] through the ViT, every intermediate kept: {"stem": …, "blocks": […], …}."""
    bb = model.backbone
    d = bb.embed_dim
    ph, pw = bb.patch_embed.patch_size
    patches = F.unfold(img[None], (ph, pw), stride=(ph, pw))[0].T  # [N, C·ph·pw], grid row-major
    if hasattr(bb.patch_embed, "stem"):  # a convolutional stem: relevance stops at its output, the 1×1 proj's input
        patches = bb.patch_embed.stem(img[None])[0].flatten(1).T  # [N, C'], grid row-major
    w_pe = bb.patch_embed.proj.weight.reshape(d, -1)
    z = patches @ w_pe.T + bb.patch_embed.proj.bias
    prefix = [bb.cls_token[0]] + ([bb.reg_token[0]] if getattr(bb, "reg_token", None) is not None else [])
    if getattr(bb, "dist_token", None) is not None:
        prefix.append(bb.dist_token[0])
    p = sum(t.shape[0] for t in prefix)
    pos = bb.pos_embed[0]
    if bb.no_embed_class:
        zp = z + pos
        tokens = torch.cat([*prefix, zp])
    else:
        tokens = torch.cat([*prefix, z]) + pos
        zp = tokens[p:]
    rec = {"patches": patches, "w_pe": w_pe, "z": z, "zp": zp, "p": p, "blocks": []}
    x = tokens
    for blk in bb.blocks:
        attn = blk.attn
        hd, dh = attn.num_heads, attn.head_dim
        b = {"x": x, "t1": norm(blk.norm1, x)}
        b["qkv"] = linear(attn.qkv, b["t1"])
        heads = []
        for h in range(hd):
            q_raw = b["qkv"][:, h * dh : (h + 1) * dh]
            k_raw = b["qkv"][:, d + h * dh : d + (h + 1) * dh]
            v = b["qkv"][:, 2 * d + h * dh : 2 * d + (h + 1) * dh]
            q, k = norm(attn.q_norm, q_raw), norm(attn.k_norm, k_raw)
            s = (q @ k.T) * dh**-0.5
            e = torch.exp(s - s.max(-1, keepdim=True).values)
            a = e / e.sum(-1, keepdim=True)
            heads.append({"q_raw": q_raw, "k_raw": k_raw, "q": q, "k": k, "v": v, "s": s, "a": a, "o": a @ v})
        b["heads"] = heads
        b["ocat"] = torch.cat([hh["o"] for hh in heads], -1)
        assert isinstance(attn.norm, nn.Identity)
        b["o"] = linear(attn.proj, b["ocat"])
        b["a1"] = layer_scale(blk.ls1, b["o"])
        b["x_mid"] = x + b["a1"]
        b["t2"] = norm(blk.norm2, b["x_mid"])
        b["h"] = linear(blk.mlp.fc1, b["t2"])
        b["g"] = F.gelu(b["h"])
        assert isinstance(blk.mlp.norm, nn.Identity)
        b["m"] = linear(blk.mlp.fc2, b["g"])
        b["a2"] = layer_scale(blk.ls2, b["m"])
        x = b["x_mid"] + b["a2"]
        rec["blocks"].append(b)
    rec["x_out"] = x
    rec["xn"] = norm(bb.norm, x)
    rows = pool_rows(bb)
    rec["pooled_raw"] = rec["xn"][rows].mean(0)
    rec["pooled"] = norm(bb.fc_norm, rec["pooled_raw"])
    h, ins = rec["pooled"], []
    for m in head_layers(model):
        ins.append(h)
        h = linear(m, h) if isinstance(m, nn.Linear) else F.gelu(h)
    rec["head_in"], rec["f"] = ins, h
    return rec


def as_double(model, images):
    return copy.deepcopy(model).double(), images.double()


# --------------------------------------------------------------------------------- AttnLRP: the rules


def eps_rule(x, weight, z, r, eps):
    """ε-LRP for z = x Wᵀ + b: R_x = x ⊙ (R / (z + ε·sign z)) W."""
    return x * ((r / (z + eps * torch.where(z >= 0, 1.0, -1.0))) @ weight)


def add_rule(a, b, r):
    """LRP-0 for z = a + b: each term's share a / z of R."""
    return a * r / (a + b), b * r / (a + b)


def layer_norm_rule(mod, x, r):
    """y = c·w/sd + b with c = x − mean: the bias absorbs b/y of R; identity through ·w and /sd;
    LRP-0 through the centring map C = I − 11ᵀ/D (symmetric): R_x = x ⊙ C (R_c / c)."""
    if isinstance(mod, nn.Identity):
        return r
    c = x - x.mean(-1, keepdim=True)
    y = norm(mod, x)
    r_c = (y - mod.bias) * r / y
    u = r_c / c
    return x * (u - u.mean(-1, keepdim=True))


def softmax_rule(s, a, r):
    """AttnLRP softmax rule: R_s = s ⊙ (R_a − a Σ_j R_a)."""
    return s * (r - a * r.sum(-1, keepdim=True))


def attnlrp_one(model, rec, c, eps, sinks=None):
    """Explicit AttnLRP for one image and target c → token map [N] (summed over each patch's pixels)."""
    bb = model.backbone
    r = torch.zeros_like(rec["f"])
    r[c] = rec["f"][c]
    for m, x in zip(reversed(head_layers(model)), reversed(rec["head_in"]), strict=True):
        if isinstance(m, nn.Linear):
            e = eps if type(m).forward is nn.Linear.forward else 0.0
            r = eps_rule(x, m.weight, linear(m, x), r, e)  # GELU: identity
    r = layer_norm_rule(bb.fc_norm, rec["pooled_raw"], r)
    rows = pool_rows(bb)
    r_xn = torch.zeros_like(rec["xn"])
    r_xn[rows] = rec["xn"][rows] / len(rows) * r / rec["pooled_raw"]  # LRP-0 on the mean (a pick if one row)
    r = layer_norm_rule(bb.norm, rec["x_out"], r_xn)
    for blk, b in zip(reversed(bb.blocks), reversed(rec["blocks"]), strict=True):
        attn = blk.attn
        r_mid, r_a2 = add_rule(b["x_mid"], b["a2"], r)
        r_g = eps_rule(b["g"], blk.mlp.fc2.weight, b["m"], r_a2, eps)  # LayerScale: identity
        r_t2 = eps_rule(b["t2"], blk.mlp.fc1.weight, b["h"], r_g, eps)  # GELU: identity
        r_mid = r_mid + layer_norm_rule(blk.norm2, b["x_mid"], r_t2)
        r_x, r_a1 = add_rule(b["x"], b["a1"], r_mid)
        r_ocat = eps_rule(b["ocat"], attn.proj.weight, b["o"], r_a1, eps)
        dh = attn.head_dim
        r_q, r_k, r_v = [], [], []
        for h, hh in enumerate(b["heads"]):
            r_o = r_ocat[:, h * dh : (h + 1) * dh]
            u = r_o / (2 * hh["o"])  # A·V, uniform: each factor half of the ε=0 rule
            r_a = hh["a"] * (u @ hh["v"].T)
            r_v.append(hh["v"] * (hh["a"].T @ u))
            r_s = softmax_rule(hh["s"], hh["a"], r_a)
            if sinks is not None:
                sinks["softmax"] += float(r_a.sum() - r_s.sum())
            u = r_s / (2 * hh["s"])  # s = scale·q·kᵀ, uniform
            r_q.append(layer_norm_rule(attn.q_norm, hh["q_raw"], hh["q"] * (dh**-0.5 * u @ hh["k"])))
            r_k.append(layer_norm_rule(attn.k_norm, hh["k_raw"], hh["k"] * (dh**-0.5 * u.T @ hh["q"])))
        r_qkv = torch.cat(r_q + r_k + r_v, -1)
        r_t1 = eps_rule(b["t1"], attn.qkv.weight, b["qkv"], r_qkv, eps)
        r = r_x + layer_norm_rule(blk.norm1, b["x"], r_t1)
    p = rec["p"]
    r_z = rec["z"] * r[p:] / rec["zp"]
    if sinks is not None:
        sinks["prefix"] += float(r[:p].sum())
    r_patches = eps_rule(rec["patches"], rec["w_pe"], rec["z"], r_z, eps)
    return r_patches.sum(-1)


def attnlrp_ref(model, images, targets, eps=0.0, sinks=None):
    model, images = as_double(model, images)
    gh, gw = model.backbone.patch_embed.grid_size
    out = torch.zeros(images.shape[0], len(targets), gh, gw, dtype=torch.float64)
    with torch.no_grad():
        for i in range(images.shape[0]):
            rec = forward(model, images[i])
            for j, c in enumerate(targets):
                out[i, j] = attnlrp_one(model, rec, c, eps, sinks).reshape(gh, gw)
    return out


# ------------------------------------------------------------------- Transformer Attribution: the rules


def sd(a, b):
    """The authors' safe_divide: a / (b + 1e-9), 0 where b = 0."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).to(den.dtype) * 1e-9
    return a / den * b.ne(0).to(b.dtype)


def z_plus(x, weight, r):
    """LRP-α1β0 (their Linear.relprop with alpha=1): positive contributions only, bias ignored."""
    pw, nw, px, nx = weight.clamp(min=0), weight.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
    s = sd(r, px @ pw.T + nx @ nw.T)
    return px * (s @ pw) + nx * (s @ nw)


def add_relprop(a, b, r):
    """Their Add.relprop: LRP-0 shares, rescaled so the two parts split Σ R as |Σ a'| : |Σ b'|."""
    s = sd(r, a + b)
    ra, rb = a * s, b * s
    fa = sd(ra.sum().abs(), ra.sum().abs() + rb.sum().abs()) * r.sum()
    fb = sd(rb.sum().abs(), ra.sum().abs() + rb.sum().abs()) * r.sum()
    return ra * sd(fa, ra.sum()), rb * sd(fb, rb.sum())


def clone_relprop(x, r1, r2):
    return x * (sd(r1, x) + sd(r2, x))


def transformer_attribution_one(model, rec, grads_a, c):
    """Relevance of each A_l by their LRP pass (seed one-hot = 1), Ā_l = mean_h (∇A ⊙ R_A)⁺, rollout."""
    bb = model.backbone
    r = torch.zeros_like(rec["f"])
    r[c] = 1.0
    for m, x in zip(reversed(head_layers(model)), reversed(rec["head_in"]), strict=True):
        if isinstance(m, nn.Linear):
            r = z_plus(x, m.weight, r)  # GELU, fc_norm, final norm: identity
    rows = pool_rows(bb)
    r_xn = torch.zeros_like(rec["xn"])
    r_xn[rows] = rec["xn"][rows] * sd(r, rec["pooled_raw"]) / len(rows)
    r = r_xn
    a_bars = []
    for li in reversed(range(len(bb.blocks))):
        blk, b = bb.blocks[li], rec["blocks"][li]
        attn = blk.attn
        r_mid, r_a2 = add_relprop(b["x_mid"], b["a2"], r)
        r_t2 = z_plus(b["t2"], blk.mlp.fc1.weight, z_plus(b["g"], blk.mlp.fc2.weight, r_a2))
        r_mid = clone_relprop(b["x_mid"], r_mid, r_t2)
        r_x, r_a1 = add_relprop(b["x"], b["a1"], r_mid)
        r_ocat = z_plus(b["ocat"], attn.proj.weight, r_a1)
        dh = attn.head_dim
        cams, r_q, r_k, r_v = [], [], [], []
        for h, hh in enumerate(b["heads"]):
            s = sd(r_ocat[:, h * dh : (h + 1) * dh], hh["o"])
            r_a = hh["a"] * (s @ hh["v"].T) / 2
            r_v.append(hh["v"] * (hh["a"].T @ s) / 2)
            cams.append((grads_a[li][h] * r_a).clamp(min=0))
            s1 = sd(r_a, hh["q"] @ hh["k"].T)  # softmax: identity; Q Kᵀ without the scale
            r_q.append(hh["q"] * (s1 @ hh["k"]) / 2)
            r_k.append(hh["k"] * (s1.T @ hh["q"]) / 2)
        a_bars.append(torch.stack(cams).mean(0))
        r_t1 = z_plus(b["t1"], attn.qkv.weight, torch.cat(r_q + r_k + r_v, -1))
        r = clone_relprop(b["x"], r_x, r_t1)
    n = r.shape[0]
    joint = torch.eye(n, dtype=r.dtype)
    for a_bar in reversed(a_bars):  # blocks 1 … L: joint = (I + Ā_l)·joint
        joint = (torch.eye(n, dtype=r.dtype) + a_bar) @ joint
    return joint[0, rec["p"] :]


def transformer_attribution_ref(model, images, targets):
    model, images = as_double(model, images)
    gh, gw = model.backbone.patch_embed.grid_size
    out = torch.zeros(images.shape[0], len(targets), gh, gw, dtype=torch.float64)
    for i in range(images.shape[0]):
        with torch.enable_grad():
            rec = forward(model, images[i])
            mats = [[hh["a"] for hh in b["heads"]] for b in rec["blocks"]]
            flat = [a for layer in mats for a in layer]
            for j, c in enumerate(targets):
                g = torch.autograd.grad(rec["f"][c], flat, retain_graph=True)
                it = iter(g)
                grads_a = [[next(it) for _ in layer] for layer in mats]
                with torch.no_grad():
                    detached = _detach(rec)
                    out[i, j] = transformer_attribution_one(model, detached, grads_a, c).reshape(gh, gw)
    return out


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detach(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- tests


def assert_maps_close(got, want, tol=TOL, dtype=torch.float32):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == dtype
    scale = want.abs().max()
    err = (got.double() - want).abs().max()
    assert scale > 0, "reference map is all zeros: the test would prove nothing"
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x max|ref| {scale:.3g}"


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    return make_model(request.param)


@pytest.mark.parametrize("targets", [None, ["calcification", 0]])
def test_attnlrp_matches_reference(model, targets):
    x = make_images(model, 3, seed=3)
    idx = [0, 1, 2] if targets is None else [2, 0]
    assert_maps_close(explain(model, x, "attnlrp", targets=targets), attnlrp_ref(model, x, idx))


@pytest.mark.parametrize("fused", [True, False])
def test_attnlrp_epsilon_rule_and_both_attention_paths(fused):
    m = make_model("reg4")
    for blk in m.backbone.blocks:
        blk.attn.fused_attn = fused
    x = make_images(m, 2, seed=4)
    assert_maps_close(explain(m, x, "attnlrp", targets=[1, 2], epsilon=0.05), attnlrp_ref(m, x, [1, 2], eps=0.05))
    assert all(blk.attn.fused_attn is fused for blk in m.backbone.blocks)


@pytest.mark.parametrize("targets", [None, ["subtlety", 2]])
def test_transformer_attribution_matches_reference(model, targets):
    """Exact in float64 (≤ 1e-9). In float32 only to TA_FLOAT32_TOL: the method itself is ill-conditioned
    (its residual rule divides by Σ a′, a sum of LRP-0 shares that can nearly cancel), so float32 rounding
    of the forward pass alone moves the map by up to ~1e-3 of its scale on these random ViTs; the same
    happens in float64 when the input is perturbed by 1e-7 (see test_transformer_attribution_conditioning)."""
    x = make_images(model, 3, seed=5)
    idx = [0, 1, 2] if targets is None else [1, 2]
    want = transformer_attribution_ref(model, x, idx)
    got64 = explain(copy.deepcopy(model).double(), x.double(), "transformer-attribution", targets=targets)
    assert_maps_close(got64, want, tol=1e-9, dtype=torch.float64)
    assert_maps_close(explain(model, x, "transformer-attribution", targets=targets), want, tol=TA_FLOAT32_TOL)


def test_transformer_attribution_conditioning():
    """Why the float32 tolerance is looser: in float64, a 1e-7 relative change of the input moves the map by
    far more than 1e-5 of its scale; without the residual rule's rescaling it would not."""
    import medvit_explain.explainers.transformer_attribution as ta

    m = copy.deepcopy(make_model("avgpool")).double()
    x = make_images(m, 2, seed=5).double()
    x2 = x * (1 + 1e-7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype))

    def moved():
        a, b = explain(m, x, "transformer-attribution"), explain(m, x2, "transformer-attribution")
        return float((a - b).abs().max() / a.abs().max())

    assert moved() > 1e-5
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ta, "residual_split", lambda r, a, b: (a * ta.safe_divide(r, a + b), b * ta.safe_divide(r, a + b)))
        assert moved() < 1e-4


def _bias_free(variant: str, depth: int, zero_values: bool):
    """A ViT whose only relevance sinks are the prefix tokens and the softmax: no biases (linear layers,
    patch embedding, LayerNorms, head), position embedding 0; with ``zero_values`` also W_v = 0."""
    m = make_model(variant, depth=depth)
    bb = m.backbone
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "pos_embed" in name:
                p.zero_()
        if zero_values:
            for blk in bb.blocks:
                blk.attn.qkv.weight[2 * bb.embed_dim :] = 0
    return m


def test_attnlrp_conserves_relevance_when_nothing_absorbs_it():
    """Hand-checked: one block, average pooling, no biases, position embedding 0, W_v = 0 (the attention
    passes nothing, so the softmax and the class token get no relevance): every rule left (ε = 0 linear,
    LayerNorm identity, GELU identity, residual and mean LRP-0) is conservative, Σ map = f_c."""
    m = _bias_free("avgpool", depth=1, zero_values=True)
    x = make_images(m, 3, seed=6)
    maps = explain(m, x, "attnlrp")
    with torch.no_grad():
        f = m(x)
    torch.testing.assert_close(maps.sum((-2, -1)), f, rtol=1e-5, atol=1e-6)
    assert (maps.flatten(2).std(-1) > 0).all()


@pytest.mark.parametrize("depth", [1, 2])
def test_attnlrp_conservation_up_to_the_softmax_bias_term(depth):
    """With the values on and class-token pooling, Σ map = f_c − (what the class token keeps) − (what the
    softmax rule's dropped bias term absorbs), both terms from the reference; the softmax term is not
    negligible (the rule is not conservative, as the paper says)."""
    m = _bias_free("plain", depth=depth, zero_values=False)
    x = make_images(m, 1, seed=7)
    with torch.no_grad():
        f = m(x)[0]
    for c in range(3):
        sinks = {"softmax": 0.0, "prefix": 0.0}
        attnlrp_ref(m, x, [c], sinks=sinks)
        total = float(explain(m, x, "attnlrp", targets=[c]).sum())
        assert abs(total + sinks["softmax"] + sinks["prefix"] - float(f[c])) <= 1e-5 * abs(float(f[c]))
        assert abs(sinks["softmax"]) > 1e-3 * abs(float(f[c]))


def test_unsupported_blocks_say_so():
    from timm.layers import SwiGLU

    m = make_model("plain")
    blk = m.backbone.blocks[0]
    blk.mlp = SwiGLU(blk.mlp.fc1.in_features, 16)
    for method in ("attnlrp", "transformer-attribution"):
        with pytest.raises(ModelNotSupportedError, match="Mlp"):
            explain(m, make_images(m, 1), method)
    m = make_model("plain")
    m.backbone.norm = nn.GroupNorm(1, m.backbone.embed_dim)
    with pytest.raises(ModelNotSupportedError, match="no rule for the normalisation backbone.norm"):
        explain(m, make_images(m, 1), "attnlrp")


def test_transformer_attribution_refuses_other_block_layouts():
    from timm.models.vision_transformer import Block

    class PostNormBlock(Block):
        def forward(self, x, attn_mask=None, is_causal=False):
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))

    m = make_model("plain")
    m.backbone.blocks[1].__class__ = PostNormBlock
    with pytest.raises(ModelNotSupportedError, match="pre-norm Block"):
        explain(m, make_images(m, 1), "transformer-attribution")
    assert torch.isfinite(explain(m, make_images(m, 1), "attnlrp")).all()  # rules by module: any layout


def _model_state(m):
    return (
        [(k, v.clone()) for k, v in m.state_dict().items()],
        [mod.training for mod in m.modules()],
        [p.requires_grad for p in m.parameters()],
        [getattr(mod, "fused_attn", None) for mod in m.modules()],
    )


def _assert_left_as_found(m, state):
    params, training, requires, fused = state
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in params)
    assert [mod.training for mod in m.modules()] == training
    assert [p.requires_grad for p in m.parameters()] == requires
    assert [getattr(mod, "fused_attn", None) for mod in m.modules()] == fused
    for mod in m.modules():
        assert "forward" not in mod.__dict__, f"a swapped forward was left on {type(mod).__name__}"
        assert not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks
    assert all(p.grad is None for p in m.parameters())


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("method", ["attnlrp", "transformer-attribution"])
def test_model_left_as_found_even_after_an_exception(method):
    m = make_model("qknorm-layerscale-mlphead")
    m.train()
    m.backbone.blocks[0].attn.qkv.weight.requires_grad_(False)
    m.backbone.blocks[0].attn.fused_attn = False
    state = _model_state(m)
    x = make_images(m, 2)
    a = explain(m, x, method)
    _assert_left_as_found(m, state)
    with torch.no_grad():
        assert torch.equal(explain(m, x, method), a)

    def boom(module, args, output):
        raise _Boom("inside the swapped forward")

    handle = m.backbone.blocks[-1].mlp.fc2.register_forward_hook(boom)
    with pytest.raises(_Boom):
        explain(m, x, method)
    handle.remove()
    _assert_left_as_found(m, state)


@pytest.mark.parametrize("method", ["attnlrp", "transformer-attribution"])
def test_batch_and_target_order_do_not_matter(method):
    m = make_model("nonsquare")
    x = make_images(m, 3, seed=8)
    whole = explain(m, x, method, targets=[2, 0, 1])
    for i in range(3):
        one = explain(m, x[i : i + 1], method, targets=[1, 2])
        torch.testing.assert_close(one[0], whole[i, [2, 0]], rtol=1e-5, atol=1e-6 * float(whole.abs().max()))


# ------------------------------------------------------------------------------ the shipped sample model


@pytest.fixture(scope="module")
def sample_model_and_slices():
    from medvit_explain.io import load_volume
    from medvit_explain.model import load_model
    from medvit_explain.prediction import model_inputs

    model = load_model(device="cpu")
    volume = load_volume(ROOT / "sample_data" / "phantom_001.nii.gz")
    return model, model_inputs(model, volume).images([8, 12, 20, 30]).as_subclass(torch.Tensor)


@pytest.mark.parametrize("method", ["attnlrp", "transformer-attribution"])
def test_sample_model_all_targets_in_one_call(sample_model_and_slices, method):
    model, x = sample_model_and_slices
    maps = explain(model, x, method)
    gh, gw = model.backbone.patch_embed.grid_size
    assert maps.shape == (4, 9, gh, gw) and torch.isfinite(maps).all()
    flat = maps.flatten(2)
    for i in range(4):
        for a in range(9):
            for b in range(a + 1, 9):
                assert not torch.allclose(flat[i, a], flat[i, b]), (i, a, b)
    if method == "attnlrp":
        assert_maps_close(maps[1:3, [5, 0]], attnlrp_ref(model, x[1:3], [5, 0]))
    else:
        assert_maps_close(maps[1:3, [5, 0]], transformer_attribution_ref(model, x[1:3], [5, 0]), tol=TA_FLOAT32_TOL)


# ------------------------------------------------------------------------------------- lxt (optional)
# lxt (pip install lxt; the ``lxt`` extra) is the AttnLRP authors' implementation. Its explicit functions
# (the ICML 2024 code) import without transformers; lxt.efficient imports its transformers model patches
# and needs a transformers it was written for (lxt 2.1: transformers < 5).


def _lxt_explicit_maps(model, images, targets):
    """The timm ViT written with lxt's explicit AttnLRP functions: linear_epsilon, layer_norm, softmax, matmul,
    add2, the identity rule on GELU and the ε-rule on the patch convolution; relevance at the input pixels
    (lxt's ViT recipe), summed over channels and each patch."""
    lf = pytest.importorskip("lxt.explicit.functional", reason="lxt is not installed (pip install lxt)")
    from lxt.explicit import rules

    bb = model.backbone
    gh, gw = bb.patch_embed.grid_size

    def ln(mod, t):
        return lf.layer_norm(t, mod.weight, mod.bias, mod.eps)

    maps = []
    for c in targets:
        x = images.clone().requires_grad_(True)
        z = rules.epsilon_lrp(bb.patch_embed.proj, 1e-6, x).flatten(2).transpose(1, 2)
        prefix = [bb.cls_token] + ([bb.reg_token] if getattr(bb, "reg_token", None) is not None else [])
        tokens = torch.cat([p.expand(x.shape[0], -1, -1) for p in prefix] + [z], 1)
        h = lf.add2(tokens, bb.pos_embed.expand(x.shape[0], -1, -1))
        for blk in bb.blocks:
            attn = blk.attn
            b, n, d = h.shape
            qkv = lf.linear_epsilon(ln(blk.norm1, h), attn.qkv.weight, attn.qkv.bias)
            q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            a = lf.softmax(lf.matmul(q, k.transpose(-2, -1)), -1, temperature=1 / attn.scale)
            o = lf.matmul(a, v).transpose(1, 2).reshape(b, n, d)
            h = lf.add2(h, lf.linear_epsilon(o, attn.proj.weight, attn.proj.bias))
            t = rules.identity(blk.mlp.act, lf.linear_epsilon(ln(blk.norm2, h), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
            h = lf.add2(h, lf.linear_epsilon(t, blk.mlp.fc2.weight, blk.mlp.fc2.bias))
        out = lf.linear_epsilon(ln(bb.norm, h)[:, 0], model.head.weight, model.head.bias)
        seed = torch.zeros_like(out)
        seed[:, c] = out[:, c]
        out.backward(seed)  # explicit LRP: the seed is the relevance f_c, .grad is relevance
        r = x.grad.sum(1)
        maps.append(r.reshape(x.shape[0], gh, r.shape[1] // gh, gw, r.shape[2] // gw).sum((2, 4)))
    return torch.stack(maps, 1).detach()


@pytest.mark.parametrize("variant", ["plain", "reg4", "nonsquare"])
def test_attnlrp_matches_lxt_explicit(variant, monkeypatch):
    """lxt's explicit functions stabilise every denominator with an unsigned ε (linear 1e-6 on z + ε, sums and
    matmuls 1e-8, LayerNorm 1e-6 on y); with those set to 0 they are the rules here with ε = 0 (float32
    agreement ~1e-6); at lxt's defaults against epsilon=1e-6 they differ by O(ε/|z|) (up to ~3e-4 measured)."""
    pytest.importorskip("lxt.explicit.functional", reason="lxt is not installed (pip install lxt)")
    import lxt.explicit.functional as lf
    from lxt.explicit import rules

    m = make_model(variant)
    x = make_images(m, 2, seed=9)
    at_defaults = _lxt_explicit_maps(m, x, [0, 2])
    assert_maps_close(explain(m, x, "attnlrp", targets=[0, 2], epsilon=1e-6), at_defaults.double(), tol=1e-3)
    stabilise = lf._stabilize
    monkeypatch.setattr(lf, "_stabilize", lambda t, epsilon=0.0, inplace=False: stabilise(t, 0.0, inplace))
    monkeypatch.setattr(rules, "_stabilize", lf._stabilize)
    unstabilised = _lxt_explicit_maps(m, x, [0, 2])
    assert_maps_close(explain(m, x, "attnlrp", targets=[0, 2]), unstabilised.double())


def test_attnlrp_matches_lxt_efficient():
    """lxt's own efficient rules (its LayerNorm and GELU patches, its q/4, k/4, v/2 attention wrapper) put on
    timm's classes with a patch map, as lxt.efficient.monkey_patch does; the classes are restored after."""
    pytest.importorskip(
        "lxt.efficient",
        reason="lxt.efficient is not importable (lxt not installed, or its transformers patches need transformers<5)",
        exc_type=ImportError,
    )
    from lxt.efficient.patches import layer_norm_forward, non_linear_forward, patch_method, wrap_attention_forward
    from timm.layers import Attention
    from timm.layers import LayerNorm as TimmLayerNorm

    eager = wrap_attention_forward(lambda mod, q, k, v: ((q * mod.scale) @ k.transpose(-2, -1)).softmax(-1) @ v)

    def attention_forward(self, x, attn_mask=None, is_causal=False):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        o = eager(self, q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(self.norm(o)))

    m = make_model("qknorm-layerscale-mlphead")
    x = make_images(m, 3, seed=10)
    ours = explain(m, x, "attnlrp")
    classes = (TimmLayerNorm, nn.LayerNorm, nn.GELU, Attention)
    saved = {cls: {k: cls.__dict__[k] for k in ("forward", "original_forward") if k in cls.__dict__} for cls in classes}
    try:
        patch_method(layer_norm_forward, TimmLayerNorm)
        patch_method(layer_norm_forward, nn.LayerNorm)
        patch_method(non_linear_forward, nn.GELU, keep_original=True)
        patch_method(attention_forward, Attention)
        maps = []
        for c in range(3):
            xi = x.clone().requires_grad_(True)
            m(xi)[:, c].sum().backward()
            r = (xi * xi.grad).sum(1)  # lxt's efficient readout: input x gradient
            gh, gw = m.backbone.patch_embed.grid_size
            maps.append(r.reshape(3, gh, r.shape[1] // gh, gw, r.shape[2] // gw).sum((2, 4)))
    finally:
        for cls, attrs in saved.items():
            for k in ("forward", "original_forward"):
                if k in attrs:
                    setattr(cls, k, attrs[k])
                elif k in cls.__dict__:
                    delattr(cls, k)
    m.zero_grad(set_to_none=True)
    assert_maps_close(ours, torch.stack(maps, 1).detach().double())
