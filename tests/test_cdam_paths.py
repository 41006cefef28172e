"""scripts/cdam_paths.py: CDAM split by the role each token plays in the last attention (key, value, query)
sums to CDAM exactly, the query part is zero on patch tokens, and the value part equals its closed form
Σ_h A_h[CLS, i] · (W_v,h T_i) · ∂f/∂o_h[CLS] computed from the slow reference of test_explain_exactness."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.test_explain_exactness import assert_maps_close, ref
from tests.vit_models import VARIANTS, make_images, make_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cdam_paths.py"
paths = runpy.run_path(str(SCRIPT), run_name="cdam_paths")


def value_part_closed_form(model, x, c):
    """[gh, gw]: Σ_h A_h[CLS, i] (W_v,h T_i)·g_h with g_h = ∂f_c/∂(head h's CLS output), one image."""
    bb, blk = model.backbone, model.backbone.blocks[-1]
    x_last = ref.last_block_input(model, x).detach()
    t = ref.norm(blk.norm1, x_last)
    attn = blk.attn
    b, n, d = t.shape
    h, dh = attn.num_heads, attn.head_dim
    qkv = F.linear(t, attn.qkv.weight, attn.qkv.bias).reshape(b, n, 3, h, dh).permute(2, 0, 3, 1, 4)
    q, k = ref.norm(attn.q_norm, qkv[0]), ref.norm(attn.k_norm, qkv[1])
    a = (q @ k.transpose(-2, -1) / dh**0.5).softmax(-1)  # [1, H, N, N]
    o = (a @ qkv[2]).detach().requires_grad_(True)  # the heads' outputs, a leaf
    out = F.linear(ref.norm(attn.norm, o.transpose(1, 2).reshape(b, n, d)), attn.proj.weight, attn.proj.bias)
    xx = x_last + ref.layer_scale(blk.ls1, out)
    hdn = F.linear(
        F.gelu(F.linear(ref.norm(blk.norm2, xx), blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
        blk.mlp.fc2.weight,
        blk.mlp.fc2.bias,
    )
    (g,) = torch.autograd.grad(model.head(ref.pooled(bb, xx + ref.layer_scale(blk.ls2, hdn)))[0, c], o)
    w_v = attn.qkv.weight[2 * d :].reshape(h, dh, d)
    v_no_bias = torch.einsum("hed,nd->hne", w_v, t[0])  # W_v,h T_i
    per_token = torch.einsum("hn,hne,he->n", a[0, :, 0], v_no_bias, g[0, :, 0])
    return ref.grid(model, per_token).detach()


CLASS_TOKEN = [v for v in VARIANTS if v not in ("distilled", "avgpool")]


@pytest.mark.parametrize("variant", CLASS_TOKEN)
def test_the_parts_sum_to_cdam_and_the_value_part_is_its_closed_form(variant):
    model = make_model(variant)
    x = make_images(model, 3, seed=1)
    for c in (0, 2):
        parts = paths["cdam_by_path"](model, x, c)
        want = ref.cdam(model, x, [c])[:, 0]
        assert_maps_close(parts["keys"] + parts["values"] + parts["query"], want)
        assert_maps_close(parts["cdam"], want)
        assert torch.count_nonzero(parts["query"]) == 0  # a patch token's own query never reaches the head
        closed = torch.stack([value_part_closed_form(model, x[i : i + 1], c) for i in range(len(x))])
        assert_maps_close(parts["values"], closed)
        assert torch.count_nonzero(parts["keys"]) > 0  # where the class token looks matters too


@pytest.mark.parametrize("variant", ["distilled", "avgpool"])
def test_a_head_that_reads_more_than_the_class_token_is_refused(variant):
    model = make_model(variant)
    with pytest.raises(ValueError, match="reads the class token alone"):
        paths["cdam_by_path"](model, make_images(model, 1, seed=0), 0)


def test_part_statistics_on_a_map_at_pixel_resolution():
    """On a map already at the views' size (bilinear to the same size is the identity) the statistics are
    plain means: a view with the part at +2 and the rest of the nodule at -1, one with the part at -1."""
    maps = torch.zeros(2, 4, 4)
    features = np.zeros((2, 4, 4), np.int64)
    features[:, 0, :2] = 2  # the part
    features[:, 1, :2] = 1  # the rest of the nodule
    maps[0, 0, :2], maps[0, 1, :2], maps[0, 3, 3] = 2.0, -1.0, 2.0
    maps[1, 0, :2], maps[1, 2, 2] = -1.0, 1.0
    stats = paths["part_statistics"](maps, features, 2, np.array([2.0, 1.0]))
    assert stats["part"] == pytest.approx((1.0 + -1.0) / 2)
    assert stats["rest"] == pytest.approx((-0.5 + 0.0) / 2)
    assert stats["outside"] == pytest.approx((1.0 / 12 + 1.0 / 12) / 2)
    assert stats["negative_views"] == 0.5
    assert stats["positive_share"] == pytest.approx((4.0 / 6.0 + 0.0) / 2)
