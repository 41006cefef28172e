"""Attention baselines: last-layer attention, attention rollout, Chefer gradient-weighted rollout."""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from medvit_explain.explainers.base import (
    BlockTap,
    Explainer,
    HookSet,
    explicit_attention,
    target_grads,
    tokens_to_grid,
)
from medvit_explain.registry import register

__all__ = ["Attention", "Chefer", "Rollout"]


def _softmax_attention(attn, rec: dict[str, Tensor], rows: slice = slice(None)) -> Tensor:
    return ((rec["q"][:, :, rows] * attn.scale) @ rec["k"].transpose(-2, -1)).softmax(-1)


@register
class Attention(Explainer):
    """Last block's class-token attention row, mean over heads (same map for every target)."""

    name = "attention"
    title = "Last-layer class-token attention (mean over heads)"
    citation = "Dosovitskiy et al., 'An Image is Worth 16x16 Words', ICLR 2021"
    class_sensitive, kind, space, rank = False, "attention", "token", 30

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        blocks = self.backbone.blocks
        row: list[Tensor] = []
        tap = BlockTap(
            blocks,
            [len(blocks) - 1],
            lambda i, r: row.append(_softmax_attention(blocks[i].attn, r, slice(0, 1))[:, :, 0]),
        )
        with torch.no_grad(), tap:
            self.backbone.forward_features(images)
        maps = tokens_to_grid(row[0].mean(1), self.spec)  # [B, gh, gw]
        return maps.unsqueeze(1).expand(-1, len(target_idx), *maps.shape[1:]).clone()


@register
class Rollout(Explainer):
    """Attention rollout (Abnar & Zuidema 2020): Â = rownorm((mean_h A + I)/2), R = Â_L ⋯ Â_1, CLS row."""

    name = "rollout"
    title = "Attention rollout (mean heads, (A+I)/2, product over layers)"
    citation = "Abnar & Zuidema, 'Quantifying Attention Flow in Transformers', ACL 2020"
    class_sensitive, kind, space, rank = False, "attention", "token", 31

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        blocks = self.backbone.blocks
        state: dict[str, Tensor] = {}

        def accumulate(i: int, rec: dict[str, Tensor]) -> None:
            a = _softmax_attention(blocks[i].attn, rec).mean(1)  # [B, N, N]
            eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            a = (a + eye) / 2
            a = a / a.sum(-1, keepdim=True)
            state["r"] = a if "r" not in state else a @ state["r"]

        with torch.no_grad(), BlockTap(blocks, range(len(blocks)), accumulate):
            self.backbone.forward_features(images)
        maps = tokens_to_grid(state["r"][:, 0], self.spec)
        return maps.unsqueeze(1).expand(-1, len(target_idx), *maps.shape[1:]).clone()


@register
class Chefer(Explainer):
    """Chefer et al. (ICCV 2021): R = I; per block R ← R + mean_h[(∇A ⊙ A)⁺]·R; CLS row, prefix dropped.

    ∇A = ∂f_c/∂A through the whole network (nothing detached). Each attention is recomputed with its
    matrix materialised (so fused attention is fine) and the module's own output is replaced by it.
    """

    name = "chefer"
    title = "Gradient-weighted attention rollout (R <- R + mean_h[(grad A * A)+] R)"
    citation = (
        "Chefer, Gur & Wolf, 'Generic Attention-model Explainability for Interpreting Bi-Modal and "
        "Encoder-Decoder Transformers', ICCV 2021"
    )
    kind, space, rank = "attention-gradient", "token", 32
    defaults = MappingProxyType({"concept": None})

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        backbone = self.backbone
        mats: list[Tensor] = []

        def explicit(module, args, output):
            out, a = explicit_attention(module, args[0])
            mats.append(a)
            return out

        # the input is made a graph leaf so that frozen weights still give a graph to differentiate
        x = images.detach().requires_grad_(True)
        with HookSet() as h:
            for blk in backbone.blocks:
                h.forward(blk.attn, explicit)
            pooled = backbone.forward_head(backbone.forward_features(x), pre_logits=True)
        grads = target_grads(self.scorer(pooled), mats, target_idx)  # each [T, B, H, N, N]
        n = mats[0].shape[-1]
        r = torch.eye(n, dtype=mats[0].dtype, device=mats[0].device).expand(len(target_idx), images.shape[0], n, n)
        for a, g in zip(mats, grads, strict=True):
            cam = (g * a.detach().unsqueeze(0)).clamp_min(0).mean(2)  # [T, B, N, N]
            r = r + cam @ r
        return tokens_to_grid(r[:, :, 0].transpose(0, 1), self.spec)
