"""LeGrad (Bousselham et al., ICCV 2025): the sensitivity of every layer's feature formation.

Per block l (all L blocks): the layer's output tokens x_l [B, P+N, D] are read through the model's own
head, s_l = head(pool(norm(x_l))) (the backbone's final norm, the model's pooling (the class token, or
class + distillation token, or the average), its ``fc_norm``, then the head; with ``concept=`` the head
is the concept score q·c̄). The gradient of s_l,c with respect to that layer's post-softmax attention maps
A^l [B, H, P+N, P+N] is clipped at zero and averaged over the H heads and over all P+N query rows (prefix
rows included, as the paper's code does), then summed over the layers:

    E_c[j] = Σ_l 1/(H·(P+N)) Σ_h Σ_i ReLU(∂s_l,c/∂A^l_h[i, j])      for every key column j,

prefix-token columns dropped, reshaped to gh×gw. Returned raw (non-negative, not normalised). The paper's
code min–max normalises each map after upsampling it bilinearly to the image; that is our display step
(:func:`~medvit_explain.explainers.display.upsample` then
:func:`~medvit_explain.explainers.display.normalize_for_display`, which adds an epsilon), so it is not
applied here; the per-map min–max also makes the paper's sum and mean over layers the same map.
Two choices of the paper's code (WalBouss/LeGrad, written for OpenCLIP models) are not followed: for CLIP
ViTs it mean-pools the intermediate tokens, and by default it uses the last two layers only
(``layer_index=-2``); here every layer is read, through the model's own pooling.

Fast path. A^l reaches s_l only through block l's own attention output O^l = A^l V^l (per head), its
residual and its MLP, all per token (the earlier blocks are upstream of A^l, the later ones are not on the
path to s_l). So ∂s_l/∂A^l_h[i, j] = g_h,i · v_h,j with g = ∂s_l/∂O^l, and row i is non-zero only for
the rows the pooling reads (``ViTSpec.read_rows``: the leading prefix rows R, e.g. only the class token).
One no-grad forward (the module's own attention, fused or not) records each block's input and q, k, v;
per block, the rows R of A^l are recomputed explicitly from q and k (the fused kernel never materialises
them), O^l at rows R becomes a graph leaf, and only those rows are re-run through the rest of block l,
the final norm, the pooling and the head. Summing s_l over the layers gives every layer's gradient from
one batched backward over the targets (each leaf feeds only its own s_l), then ∂s_l/∂A^l = g·Vᵀ. The
zero rows still count in the mean over P+N rows. With any other pooling (e.g. the average of the patch
tokens) R is every row: the same computation, exact for any pooling.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from medvit_explain.explainers.agcam import forward_with_taps
from medvit_explain.explainers.base import (
    Explainer,
    HookSet,
    attention_gate,
    attention_output,
    pooled_from_tokens,
    replace_attention_output,
    target_grads,
    tokens_to_grid,
)
from medvit_explain.registry import register

__all__ = ["LeGrad"]


@register
class LeGrad(Explainer):
    """LeGrad maps [B, T, gh, gw]: non-negative, summed over layers, unnormalised (see the module docstring)."""

    name = "legrad"
    title = "LeGrad (ReLU gradients of each layer's own score w.r.t. its attention maps, mean heads and rows)"
    citation = (
        "Bousselham, Boggust, Chaybouti, Strobelt & Kuehne, 'LeGrad: An Explainability Method for Vision "
        "Transformers via Feature Formation Sensitivity', ICCV 2025"
    )
    kind, space, rank = "attention-gradient", "token", 34
    defaults = MappingProxyType({"concept": None})

    def _rows(self, num_tokens: int) -> int:
        """How many leading query rows can have a non-zero gradient: the rows the pooling reads, else all."""
        read = self.spec.read_rows
        return num_tokens if read is None else max(read) + 1

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        blocks = self.backbone.blocks
        recs: list[dict[str, Tensor]] = [{} for _ in blocks]

        def reduce(i: int, rec: dict[str, Tensor]) -> None:
            attn = blocks[i].attn
            r = self._rows(rec["x"].shape[1])
            a = ((rec["q"][:, :, :r] * attn.scale) @ rec["k"].transpose(-2, -1)).softmax(-1)  # [B, H, R, P+N]
            v = rec["v"].contiguous()
            recs[i] = {"x": rec["x"][:, :r], "v": v, "heads": a @ v, "gate": attention_gate(attn, rec["t"][:, :r])}

        forward_with_taps(self.backbone, images, reduce)
        leaves = [rec["heads"].requires_grad_(True) for rec in recs]  # O^l at rows R, [B, H, R, dh]
        scores = None
        for blk, rec, leaf in zip(blocks, recs, leaves, strict=True):
            with HookSet() as hooks:
                replace_attention_output(hooks, blk, attention_output(blk.attn, leaf, rec["gate"]))
                x_l = blk(rec["x"])  # block l on rows R only; its attention output is the leaf's
            s_l = self.scorer(pooled_from_tokens(self.backbone, x_l))  # [B, K]
            scores = s_l if scores is None else scores + s_l
        grads = target_grads(scores, leaves, target_idx)  # each [T, B, H, R, dh]

        n_tokens = recs[0]["v"].shape[2]
        total = None
        for rec, g in zip(recs, grads, strict=True):
            d_a = torch.einsum("tbhrd,bhnd->tbhrn", g, rec["v"])  # ∂s_l/∂A^l at rows R
            term = d_a.clamp_min(0).sum((2, 3)) / (d_a.shape[2] * n_tokens)  # mean over H heads, P+N rows
            total = term if total is None else total + term
        return tokens_to_grid(total.transpose(0, 1), self.spec)
