"""Grad-SAM (Barkan et al., CIKM 2021): attention weighted by its positive gradient, mean over heads and layers.

For every block l and head h, with A^l_h = softmax(Q Kᵀ/√d) [P+N, P+N] (post-softmax) and ∂f_c/∂A^l_h the
gradient of the target's raw output through the whole network (nothing detached):

    L_c[j] = 1/(L·H) Σ_l Σ_h ReLU(∂f_c/∂A^l_h[CLS, j]) · A^l_h[CLS, j],

read on the class token's query row (the row through which the classifier's token gathers each patch;
also the class token alone for a distilled model), prefix-token columns dropped, reshaped to gh×gw. Means,
not sums (the paper's 1/(L·H)); non-negative; not normalised.

It is AG-CAM's ablation without the sigmoid: AG-CAM weights ReLU(∂f/∂A[CLS]) by sigmoid(S[CLS]) (the
pre-softmax scores) where Grad-SAM weights it by A[CLS] = softmax(S[CLS]). The other differences: AG-CAM
sums over layers and heads (a constant factor L·H), and takes its gradient with every attention input
detached (the residual path only); Grad-SAM takes the full gradient. On a one-block model the gradients
coincide, and where every score is zero (A = 1/(P+N), sigmoid(S) = 1/2) Grad-SAM = AG-CAM·2/(H·(P+N)).

Computation. ∂f/∂A_h[CLS, j] = (∂f/∂o_h)·v_h,j, with o_h the class token's per-head attention output. One
forward with grad: each attention module computes every row as usual, and its class-token row is replaced
by the same row recomputed explicitly from its q, k, v (``BlockTap``), so that o is a graph node of its own
([B, H, 1, dh] per block; neither the [P+N, P+N] matrix nor its gradient is kept). One batched backward over
the targets (``target_grads``, through the whole network) gives every block's ∂f/∂o at once. The images
are made a graph leaf so frozen weights still give a graph. Fused attention is switched off inside the
call (restored afterwards by ``captured``): the batched backward runs through every attention's backward,
and a fused kernel's backward need not support batching over targets, while the plain softmax path does.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from medvit_explain.explainers.base import (
    BlockTap,
    Explainer,
    HookSet,
    attention_gate,
    attention_output,
    target_grads,
    tokens_to_grid,
)
from medvit_explain.registry import register

__all__ = ["GradSAM"]


@register
class GradSAM(Explainer):
    """Grad-SAM maps [B, T, gh, gw]: class-token row of ReLU(∂f/∂A) ⊙ A, mean over heads and layers."""

    name = "gradsam"
    title = "Grad-SAM (class-token attention weighted by its ReLU gradient, mean over heads and layers)"
    citation = (
        "Barkan, Hauon, Caciularu, Katz, Malkiel, Armstrong & Koenigstein, 'Grad-SAM: Explaining Transformers "
        "via Gradient Self-Attention Maps', CIKM 2021"
    )
    kind, space, rank = "attention-gradient", "token", 35
    defaults = MappingProxyType({"concept": None})

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        backbone = self.backbone
        blocks = backbone.blocks
        recs: list[dict[str, Tensor]] = [{} for _ in blocks]

        def class_row(i: int, rec: dict[str, Tensor]) -> None:
            attn = blocks[i].attn
            a = ((rec["q"][:, :, :1] * attn.scale) @ rec["k"].transpose(-2, -1)).softmax(-1)  # [B, H, 1, P+N]
            recs[i] = {"a": a[:, :, 0], "v": rec["v"], "heads": a @ rec["v"], "t": rec["t"][:, :1]}

        def substitute(i: int):
            def hook(module, args, output: Tensor) -> Tensor:
                rec = recs[i]
                row = attention_output(module, rec["heads"], attention_gate(module, rec["t"]))
                return torch.cat([row, output[:, 1:]], dim=1)

            return hook

        for blk in blocks:
            if hasattr(blk.attn, "fused_attn"):
                blk.attn.fused_attn = False  # restored by ``captured``
        x = images.detach().requires_grad_(True)
        with BlockTap(blocks, range(len(blocks)), class_row), HookSet() as hooks:
            for i, blk in enumerate(blocks):
                hooks.forward(blk.attn, substitute(i))
            pooled = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
        grads = target_grads(self.scorer(pooled), [rec["heads"] for rec in recs], target_idx)  # [T, B, H, 1, dh]

        total = None
        for rec, g in zip(recs, grads, strict=True):
            d_a = torch.einsum("tbhd,bhnd->tbhn", g[:, :, :, 0], rec["v"].detach())  # ∂f/∂A[CLS row]
            term = (d_a.clamp_min(0) * rec["a"].detach().unsqueeze(0)).mean(2)  # [T, B, P+N]
            total = term if total is None else total + term
        return tokens_to_grid((total / len(blocks)).transpose(0, 1), self.spec)
