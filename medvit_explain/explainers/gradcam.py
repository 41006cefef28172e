"""Grad-CAM (Selvaraju et al., ICCV 2017) on the last block's norm1 output tokens.

weights w_d = mean over patch tokens of ∂f_c/∂T_id; map_i = ReLU(Σ_d w_d T_id) for patch tokens i.
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import Tensor

from medvit_explain.explainers.base import Explainer, HookSet, tokens_to_grid
from medvit_explain.explainers.cdam import last_block_token_grads
from medvit_explain.registry import register

__all__ = ["GradCAM"]


@register
class GradCAM(Explainer):
    """Grad-CAM maps [B, T, gh, gw] (non-negative)."""

    name = "gradcam"
    title = "Grad-CAM on the last block's norm1 tokens"
    citation = (
        "Selvaraju et al., 'Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
        "Localization', ICCV 2017"
    )
    kind, space, rank = "gradient", "token", 40
    defaults = MappingProxyType({"concept": None})

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        blocks = self.backbone.blocks
        rec: dict[str, Tensor] = {}
        with torch.no_grad(), HookSet() as h:
            h.pre(blocks[-1], lambda module, args: rec.update(x=args[0]))
            self.backbone.forward_features(images)
        t, grad = last_block_token_grads(self, rec["x"], target_idx)  # [B, N, D], [T, B, N, D]
        p = self.spec.num_prefix
        weights = grad[:, :, p:].mean(2, keepdim=True)  # [T, B, 1, D]
        cam = (weights * t[:, p:].unsqueeze(0)).sum(-1).clamp_min(0)  # [T, B, N]
        return tokens_to_grid(cam.transpose(0, 1), self.spec)
