"""Pixel-space gradient baselines, pooled to the token grid: Integrated Gradients, SmoothGrad, Input×Gradient.

Each computes a pixel attribution [T, B, C, H, W] with one forward per batch of perturbed images and one
backward batched over all targets (``torch.autograd.grad(is_grads_batched=True)``; Captum's attribute
takes one target per example, so targets would cost a forward each). Channels are averaged with sign
kept, then each patch is summed (``pool="sum"``) or averaged (``pool="mean"``).
IG uses Gauss-Legendre nodes on [0, 1] like Captum's default, so it matches
``captum.attr.IntegratedGradients`` with a zero baseline.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import torch
from torch import Tensor

from medvit_explain.explainers.base import Explainer, ViTSpec, target_grads
from medvit_explain.registry import register

STOCHASTIC = {"internal_batch_size": None, "seed": 0}

__all__ = ["InputXGradient", "IntegratedGradients", "SmoothGrad", "gauss_legendre", "pool_to_grid"]


def gauss_legendre(n: int) -> tuple[list[float], list[float]]:
    """Nodes (alphas) and weights of the n-point Gauss-Legendre rule on [0, 1]."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return [float(a) for a in 0.5 * (nodes + 1)], [float(w) for w in 0.5 * weights]


def pool_to_grid(attr: Tensor, spec: ViTSpec, pool: str) -> Tensor:
    """[..., C, H, W] pixel attribution → [..., gh, gw] (3D: [..., C, D, H, W] → [..., gd, gh, gw]): channel
    mean (signed), then patch sum or mean."""
    n = spec.spatial_dims
    a = attr.mean(-1 - n)
    lead, size = a.shape[:-n], a.shape[-n:]
    split = [d for g, s in zip(spec.grid, size) for d in (g, s // g)]
    a = a.reshape(*lead, *split)
    within = tuple(range(-1, -2 * n, -2))  # the within-patch axes
    return a.sum(within) if pool == "sum" else a.mean(within)


class _PixelExplainer(Explainer):
    kind, space = "gradient", "pixel"

    def _grads(self, x: Tensor, target_idx: list[int]) -> Tensor:
        """∂f_c/∂x for a batch x [M, C, H, W] and every target: [T, M, C, H, W]."""
        x = x.detach().requires_grad_(True)
        pooled = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return target_grads(self.scorer(pooled), [x], target_idx)[0]

    def _mean_grad(self, images: Tensor, target_idx: list[int], points) -> Tensor:
        """Σ_s w_s ∂f/∂x at points(s) [B, C, H, W], chunked by internal_batch_size: [T, B, C, H, W]."""
        b = images.shape[0]
        steps = list(points)
        total = torch.zeros((len(target_idx), *images.shape), dtype=images.dtype, device=images.device)
        for sl in self._chunks(len(steps), per_item=b):
            chunk = steps[sl]
            xs = torch.cat([make() for make, _ in chunk], 0)
            g = self._grads(xs, target_idx).reshape(len(target_idx), len(chunk), *images.shape)
            w = torch.tensor([wt for _, wt in chunk], dtype=g.dtype, device=g.device)
            total += (g * w.reshape(1, -1, *([1] * images.ndim))).sum(1)
        return total

    def _finish(self, attr: Tensor) -> Tensor:
        return pool_to_grid(attr, self.spec, str(self.options.get("pool", "sum"))).transpose(0, 1)


@register
class InputXGradient(_PixelExplainer):
    """x ⊙ ∂f_c/∂x."""

    name = "inputxgrad"
    title = "Input x Gradient, pooled to the token grid"
    citation = (
        "Shrikumar et al., 'Not Just a Black Box: Learning Important Features Through Propagating "
        "Activation Differences', arXiv:1605.01713 (2016)"
    )
    rank = 52
    defaults = MappingProxyType({"concept": None, "pool": "sum"})

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        return self._finish(images.unsqueeze(0) * self._grads(images, target_idx))


@register
class IntegratedGradients(_PixelExplainer):
    """x ⊙ Σ_k w_k ∂f_c/∂x(α_k x), zero baseline, ``n_steps`` Gauss-Legendre nodes."""

    name = "ig"
    title = "Integrated Gradients (zero baseline, Gauss-Legendre steps), pooled to the token grid"
    citation = "Sundararajan, Taly & Yan, 'Axiomatic Attribution for Deep Networks', ICML 2017"
    rank = 50
    defaults = MappingProxyType({"concept": None, "n_steps": 50, "pool": "sum", "internal_batch_size": None})

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        alphas, weights = gauss_legendre(int(self.options["n_steps"]))
        points = [((lambda a=a: images * a), w) for a, w in zip(alphas, weights, strict=True)]
        return self._finish(images.unsqueeze(0) * self._mean_grad(images, target_idx, points))


def smoothgrad_noise(images: Tensor, n_samples: int, noise_level: float, seed: int):
    """Yield the n noisy copies x + ε, ε ~ N(0, σ²), σ = noise_level·(max − min) per image (seeded)."""
    b = images.shape[0]
    flat = images.flatten(1)
    sigma = (noise_level * (flat.amax(1) - flat.amin(1))).reshape(b, *([1] * (images.ndim - 1)))
    gen = torch.Generator(device=images.device).manual_seed(int(seed))
    state = {"gen": gen}

    def make() -> Tensor:
        noise = torch.randn(images.shape, generator=state["gen"], device=images.device, dtype=images.dtype)
        return images + sigma * noise

    return [make] * n_samples


@register
class SmoothGrad(_PixelExplainer):
    """Mean of the signed gradient ∂f_c/∂x over ``n_samples`` noisy copies (σ = 0.15·range per image)."""

    name = "smoothgrad"
    title = "SmoothGrad (signed gradient averaged over Gaussian input noise), pooled"
    citation = "Smilkov et al., 'SmoothGrad: removing noise by adding noise', arXiv:1706.03825 (2017)"
    rank = 51
    defaults = MappingProxyType({"concept": None, "noise_level": 0.15, "n_samples": 50, "pool": "sum", **STOCHASTIC})

    def attribute(self, images: Tensor, target_idx: list[int]) -> Tensor:
        n = int(self.options["n_samples"])
        noise_level, seed = float(self.options["noise_level"]), self.options.get("seed") or 0
        makers = smoothgrad_noise(images, n, noise_level, seed)
        return self._finish(self._mean_grad(images, target_idx, [(m, 1.0 / n) for m in makers]))
