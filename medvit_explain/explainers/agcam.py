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

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from medvit_explain.explainers.base import (
    BlockTap,
    Explainer,
    HookSet,
    attention_gate,
    attention_output,
    check_images,
    inspect_model,
    run_prefix_chain,
    target_grads,
    tokens_to_grid,
)
from medvit_explain.registry import register

__all__ = ["AGCAM", "agcam_layers", "agcam_with_cdam", "forward_with_taps"]


@register
class AGCAM(Explainer):
    """AG-CAM maps [B, T, gh, gw] (non-negative sums over blocks and heads). Shares its forward pass
    with CDAM (:meth:`explain_jointly`): both then cost about one forward and two small backward passes."""

    name = "agcam"
    title = "Attention-guided CAM (sigmoid attention scores weighted by ReLU attention gradients)"
    citation = (
        "Leem & Seo, 'Attention Guided CAM: Visual Explanations of Vision Transformer Guided by "
        "Self-Attention', AAAI 2024"
    )
    kind, space, rank = "attention-gradient", "token", 20
    defaults = MappingProxyType({"concept": None})
    joint_with = ("cdam",)

    def explain_jointly(self, partners: Mapping[str, Explainer], images: Tensor, targets: Any) -> dict[str, Tensor]:
        with self.session(images, targets) as (x, target_idx):
            a_map, c_map = agcam_with_cdam(self, partners["cdam"], x, target_idx)
        return {"agcam": a_map.detach().to(x.dtype), "cdam": c_map.detach().to(x.dtype)}

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        blocks = self.backbone.blocks
        recs: list[dict[str, Tensor]] = [{} for _ in blocks]

        def reduce(i: int, rec: dict[str, Tensor]) -> None:
            recs[i] = self.reduce_block(i, rec)

        final = forward_with_taps(self.backbone, images, reduce)
        return self.from_records(recs, final, target_idx)

    def reduce_block(self, i: int, rec: dict[str, Tensor]) -> dict[str, Tensor]:
        """What AG-CAM keeps of block i's ``BlockTap`` record: S[CLS] [B, H, N], V, o = A[CLS]·V, gate."""
        attn = self.backbone.blocks[i].attn
        s = (rec["q"][:, :, :1] * attn.scale) @ rec["k"].transpose(-2, -1)  # [B, H, 1, N]
        v = rec["v"].contiguous()  # one copy, used here and for α (a strided view would be copied twice)
        heads = s.softmax(-1) @ v  # [B, H, 1, dh]
        gate = attention_gate(attn, rec["t"][:, :1])
        out = {"s": s[:, :, 0], "v": v, "heads": heads, "gate": gate}
        if i == 0:
            out["x0"] = rec["x"][:, :1]
        return out

    def from_records(self, recs: list[dict[str, Tensor]], final_tokens: Tensor, target_idx: list[int]) -> Tensor:
        """AG-CAM [B, T, gh, gw] from every block's reduced record and the last block's output."""
        return self.layer_terms(recs, final_tokens, target_idx).sum(2)

    def layer_terms(self, recs: list[dict[str, Tensor]], final_tokens: Tensor, target_idx: list[int]) -> Tensor:
        """Each block's term of AG-CAM, [B, T, K, gh, gw] (K blocks; their sum over K is the map):
        Σ_h ReLU(α^k) ⊙ sigmoid(S^k) of block k alone."""
        blocks = self.backbone.blocks
        leaves = [r["heads"].requires_grad_(True) for r in recs]
        outs = [attention_output(blocks[i].attn, leaves[i], recs[i]["gate"]) for i in range(len(blocks))]
        pooled = run_prefix_chain(self.backbone, 0, recs[0]["x0"], outs, final_tokens, (0,), self.spec.read_rows)
        grads = target_grads(self.scorer(pooled), leaves, target_idx)  # each [T, B, H, 1, dh]
        terms = []
        for rec, g in zip(recs, grads, strict=True):
            alpha = torch.einsum("tbhd,bhnd->tbhn", g[:, :, :, 0], rec["v"])
            terms.append((alpha.clamp_min(0) * rec["s"].sigmoid().unsqueeze(0)).sum(2))  # [T, B, N]
        return tokens_to_grid(torch.stack(terms, 2), self.spec).transpose(0, 1)  # [T, B, K, ...] → [B, T, K, ...]

    def layers(self, images: Tensor, targets: Any) -> Tensor:
        """Per-block AG-CAM terms [B, T, K, gh, gw] for ``images`` (what :meth:`explain` sums over K)."""
        with self.session(images, targets) as (x, target_idx):
            blocks = self.backbone.blocks
            recs: list[dict[str, Tensor]] = [{} for _ in blocks]

            def reduce(i: int, rec: dict[str, Tensor]) -> None:
                recs[i] = self.reduce_block(i, rec)

            final = forward_with_taps(self.backbone, x, reduce)
            return self.layer_terms(recs, final, target_idx).detach()


def agcam_layers(model, images: Tensor, targets: Any = None) -> Tensor:
    """Each block's term of AG-CAM, [B, T, K, gh, gw] for ``images`` [B, C, H, W] (K blocks): their sum
    over K is ``explain(model, images, "agcam", targets)``. Shows which layers a map comes from."""
    spec = inspect_model(model)
    check_images(images, spec)
    return AGCAM(model, spec, AGCAM.check_options({})).layers(images, targets)


def forward_with_taps(backbone, images: Tensor, on_block) -> Tensor:
    """One no-grad forward with a ``BlockTap`` on every block; returns the last block's output (pre-norm)."""
    blocks = backbone.blocks
    final: list[Tensor] = []
    with torch.no_grad(), BlockTap(blocks, range(len(blocks)), on_block), HookSet() as h:
        h.forward(blocks[-1], lambda module, args, output: final.append(output))
        backbone.forward_features(images)
    return final[-1]


def agcam_with_cdam(agcam: AGCAM, cdam, images: Tensor, target_idx: list[int]) -> tuple[Tensor, Tensor]:
    """AG-CAM and CDAM maps sharing one no-grad forward: (agcam [B, T, gh, gw], cdam [B, T, gh, gw]).

    Same maths, same operations as the two separate calls (so the same maps, bit for bit); only the
    forward pass is run once. Call inside ``agcam.session`` (both explainers must use the same scorer).
    """
    blocks = agcam.backbone.blocks
    last = len(blocks) - 1
    recs: list[dict[str, Tensor]] = [{} for _ in blocks]
    last_rec: dict[str, Tensor] = {}

    def reduce(i: int, rec: dict[str, Tensor]) -> None:
        if i == last:
            last_rec.update(rec)
        recs[i] = agcam.reduce_block(i, rec)

    final = forward_with_taps(agcam.backbone, images, reduce)
    cdam.scorer = agcam.scorer
    return agcam.from_records(recs, final, target_idx), cdam.from_record(last_rec, final, target_idx)
