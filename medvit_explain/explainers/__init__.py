"""Explainers for timm ViT predictions: ``explain(model, images, method, targets)`` → [B, T, gh, gw].

One file per method: importing this package imports every module in it, and each method class
registers itself (:func:`medvit_explain.registry.register`). Methods of other packages arrive through
the ``medvit_explain.explainers`` entry point. :func:`medvit_explain.registry.list_methods` lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from medvit_explain.errors import MethodError
from medvit_explain.explainers.base import (
    COMMON_OPTIONS,
    Explainer,
    ImageShapeError,
    ViTSpec,
    check_images,
    inspect_model,
)
from medvit_explain.explainers.display import normalize_for_display, upsample
from medvit_explain.registry import explainer_class, list_methods

__all__ = [
    "COMMON_OPTIONS",
    "Explainer",
    "ImageShapeError",
    "ViTSpec",
    "explain",
    "explain_many",
    "inspect_model",
    "list_methods",
    "normalize_for_display",
    "upsample",
]

_NOT_METHODS = {"base", "display"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _NOT_METHODS and not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")  # its method classes register themselves


def explain(model: nn.Module, images: Tensor, method: str, targets: Any = None, **options: Any) -> Tensor:
    """Explain ``model``'s outputs on ``images`` [B, C, H, W] with ``method``.

    ``targets``: names or indices into ``model.targets`` (``None`` = all), kept in the order given.
    Returns raw signed maps [B, T, gh, gw] on the model's patch grid (float32 unless the model is not).
    ``concept=example_images`` (class-sensitive methods) explains s(x) = q(x)·c̄ instead, T = 1.
    Raises ``MethodError`` (unknown method / option), ``TargetError``, ``ImageShapeError``,
    ``ModelNotSupportedError``.
    """
    cls = explainer_class(method)
    opts = cls.check_options(options)
    spec = inspect_model(model)
    check_images(images, spec)
    return cls(model, spec, opts)(images, targets)


def explain_many(
    model: nn.Module,
    images: Tensor,
    methods: Sequence[str],
    targets: Any = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Tensor]:
    """Several methods on the same images: ``{method: [B, T, gh, gw]}``, each equal to
    ``explain(model, images, method, targets, **options[method])``.

    A method that declares ``joint_with`` partners (AG-CAM with CDAM) runs with them on one shared
    forward pass when all of them are asked for and their options allow it (:meth:`Explainer.can_join`);
    every other method runs on its own.
    """
    options = options or {}
    classes = {m: explainer_class(m) for m in methods}
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise MethodError(f"options given for method(s) not asked for: {', '.join(unknown)}")
    opts = {m: classes[m].check_options(dict(options.get(m, {}))) for m in methods}
    spec = inspect_model(model)
    check_images(images, spec)
    out: dict[str, Tensor] = {}
    for m, cls in classes.items():
        partners = [p for p in cls.joint_with if p in classes and p not in out]
        if m in out or not cls.joint_with or len(partners) != len(cls.joint_with):
            continue
        if all(cls.can_join(opts[m], opts[p]) for p in partners):
            lead = cls(model, spec, opts[m])
            out.update(lead.explain_jointly({p: classes[p](model, spec, opts[p]) for p in partners}, images, targets))
    for m, cls in classes.items():
        if m not in out:
            out[m] = cls(model, spec, opts[m])(images, targets)
    return {m: out[m] for m in methods}
