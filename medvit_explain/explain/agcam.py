"""AG-CAM (Leem & Seo, AAAI 2024).

For every block k and head h: S = Q Kᵀ / √d (scale included), class-token query row only; A = softmax(S);
α = ∂f_c/∂A[CLS row] with every attention sublayer's input detached; L = Σ_k Σ_h ReLU(α) ⊙ sigmoid(S),
prefix columns dropped.

With every attention input detached, A^k[CLS] reaches the output only through the class token's own
residual stream (its MLPs and the later attentions' outputs, which are then constants). So one no-grad
forward records, per block, S[CLS], V and the class token's per-head attention output o = A[CLS]·V; a
tiny re-run of the class-token stream alone, with each o as a graph leaf, gives g = ∂f/∂o for all
targets in one batched backward, and α = g·Vᵀ per head. Works with fused attention and frozen weights
(A is never needed from the module itself).
"""

from __future__ import annotations

import torch
from torch import Tensor

from medvit_explain.explain.base import (
    BlockTap,
    Explainer,
    HookSet,
    attention_gate,
    attention_output,
    run_prefix_chain,
    target_grads,
    tokens_to_grid,
)

__all__ = ["AGCAM"]


class AGCAM(Explainer):
    """AG-CAM maps [B, T, gh, gw] (non-negative sums over blocks and heads)."""

    name = "agcam"

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        backbone = self.backbone
        blocks = backbone.blocks
        depth = len(blocks)
        recs: list[dict[str, Tensor]] = [{} for _ in range(depth)]

        def reduce(i: int, rec: dict[str, Tensor]) -> None:
            attn = blocks[i].attn
            s = (rec["q"][:, :, :1] * attn.scale) @ rec["k"].transpose(-2, -1)  # [B, H, 1, N]
            heads = s.softmax(-1) @ rec["v"]  # [B, H, 1, dh]
            gate = attention_gate(attn, rec["t"][:, :1])
            recs[i] = {"s": s[:, :, 0], "v": rec["v"], "heads": heads, "gate": gate}
            if i == 0:
                recs[i]["x0"] = rec["x"][:, :1]

        final: list[Tensor] = []
        with torch.no_grad(), BlockTap(blocks, range(depth), reduce), HookSet() as h:
            h.forward(blocks[-1], lambda module, args, output: final.append(output))
            backbone.forward_features(images)

        leaves = [r["heads"].requires_grad_(True) for r in recs]
        outs = [attention_output(blocks[i].attn, leaves[i], recs[i]["gate"]) for i in range(depth)]
        pooled = run_prefix_chain(backbone, 0, recs[0]["x0"], outs, final[-1], (0,))
        grads = target_grads(self.scorer(pooled), leaves, target_idx)  # each [T, B, H, 1, dh]

        total = None
        for rec, g in zip(recs, grads, strict=True):
            alpha = torch.einsum("tbhd,bhnd->tbhn", g[:, :, :, 0], rec["v"])
            term = (alpha.clamp_min(0) * rec["s"].sigmoid().unsqueeze(0)).sum(2)  # [T, B, N]
            total = term if total is None else total + term
        return tokens_to_grid(total.transpose(0, 1), self.spec)
