"""Import-light tables: explanation methods (no torch import here; the CLI and plugins read this).

Each method's option defaults live here too, so ``--help`` and the explainers agree on one source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["MethodInfo", "METHODS", "list_methods", "method_info", "method_names"]

_CDAM_PAPER = (
    "Brocki, Binda & Chung, 'Class-Discriminative Attention Maps for Vision Transformers', arXiv:2312.02364 (2023)"
)


@dataclass(frozen=True)
class MethodInfo:
    """One explanation method.

    ``kind``: ``"attention"`` (attention weights only), ``"attention-gradient"`` (attention weighted by
    gradients), ``"gradient"`` (token or pixel gradients). ``space``: where the raw attribution lives
    before it is put on the token grid (``"token"`` or ``"pixel"``). ``options``: accepted keyword options
    and their defaults.
    """

    name: str
    title: str
    citation: str
    class_sensitive: bool
    kind: str
    space: str
    options: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))


def _opts(**kwargs: Any) -> MappingProxyType:
    return MappingProxyType(dict(kwargs))


_STOCHASTIC = {"internal_batch_size": None, "seed": 0}

METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo(
            "cdam",
            "Class-discriminative attention map (token × gradient at the last attention input)",
            _CDAM_PAPER,
            True,
            "gradient",
            "token",
            _opts(concept=None),
        ),
        MethodInfo(
            "cdam-smooth",
            "Smooth CDAM (average CDAM over noise added to the last block's input)",
            _CDAM_PAPER,
            True,
            "gradient",
            "token",
            _opts(concept=None, noise_level=0.05, n_samples=50, **_STOCHASTIC),
        ),
        MethodInfo(
            "cdam-integrated",
            "Integrated CDAM (average CDAM along a path from a zero last-block input)",
            _CDAM_PAPER,
            True,
            "gradient",
            "token",
            _opts(concept=None, n_steps=50, noise_level=0.0, **_STOCHASTIC),
        ),
        MethodInfo(
            "agcam",
            "Attention-guided CAM (sigmoid attention scores weighted by ReLU attention gradients)",
            "Leem & Seo, 'Attention Guided CAM: Visual Explanations of Vision Transformer Guided by "
            "Self-Attention', AAAI 2024",
            True,
            "attention-gradient",
            "token",
            _opts(concept=None),
        ),
        MethodInfo(
            "attention",
            "Last-layer class-token attention (mean over heads)",
            "Dosovitskiy et al., 'An Image is Worth 16x16 Words', ICLR 2021",
            False,
            "attention",
            "token",
        ),
        MethodInfo(
            "rollout",
            "Attention rollout (mean heads, (A+I)/2, product over layers)",
            "Abnar & Zuidema, 'Quantifying Attention Flow in Transformers', ACL 2020",
            False,
            "attention",
            "token",
        ),
        MethodInfo(
            "chefer",
            "Gradient-weighted attention rollout (R <- R + mean_h[(grad A * A)+] R)",
            "Chefer, Gur & Wolf, 'Generic Attention-model Explainability for Interpreting Bi-Modal and "
            "Encoder-Decoder Transformers', ICCV 2021",
            True,
            "attention-gradient",
            "token",
            _opts(concept=None),
        ),
        MethodInfo(
            "gradcam",
            "Grad-CAM on the last block's norm1 tokens",
            "Selvaraju et al., 'Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
            "Localization', ICCV 2017",
            True,
            "gradient",
            "token",
            _opts(concept=None),
        ),
        MethodInfo(
            "ig",
            "Integrated Gradients (zero baseline, Gauss-Legendre steps), pooled to the token grid",
            "Sundararajan, Taly & Yan, 'Axiomatic Attribution for Deep Networks', ICML 2017",
            True,
            "gradient",
            "pixel",
            _opts(concept=None, n_steps=50, pool="sum", internal_batch_size=None),
        ),
        MethodInfo(
            "smoothgrad",
            "SmoothGrad (signed gradient averaged over Gaussian input noise), pooled",
            "Smilkov et al., 'SmoothGrad: removing noise by adding noise', arXiv:1706.03825 (2017)",
            True,
            "gradient",
            "pixel",
            _opts(concept=None, noise_level=0.15, n_samples=50, pool="sum", **_STOCHASTIC),
        ),
        MethodInfo(
            "inputxgrad",
            "Input x Gradient, pooled to the token grid",
            "Shrikumar et al., 'Not Just a Black Box: Learning Important Features Through Propagating "
            "Activation Differences', arXiv:1605.01713 (2016)",
            True,
            "gradient",
            "pixel",
            _opts(concept=None, pool="sum"),
        ),
    )
}

# Options every method accepts (the capture base handles them).
COMMON_OPTIONS = MappingProxyType({"autocast_dtype": None})


def method_names() -> list[str]:
    """Names of every registered method, in table order."""
    return list(METHODS)


def method_info(name: str) -> MethodInfo:
    """The registry row for ``name``; ``KeyError`` if unknown (``explain`` raises ``MethodError``)."""
    return METHODS[name]


def list_methods() -> list[dict[str, Any]]:
    """The method table as plain dicts: name, title, citation, class_sensitive, kind, space, options."""
    return [
        {
            "name": m.name,
            "title": m.title,
            "citation": m.citation,
            "class_sensitive": m.class_sensitive,
            "kind": m.kind,
            "space": m.space,
            "options": dict(m.options),
        }
        for m in METHODS.values()
    ]
