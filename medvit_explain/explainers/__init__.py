"""Explainers for timm ViT predictions: ``explain(model, images, method, targets)`` → [B, T, gh, gw].

Methods and their options are listed by :func:`medvit_explain.registry.list_methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from medvit_explain.errors import MethodError
from medvit_explain.explainers.agcam import AGCAM, agcam_with_cdam
from medvit_explain.explainers.attention_maps import Attention, Chefer, Rollout
from medvit_explain.explainers.base import Explainer, ImageShapeError, ViTSpec, check_images, inspect_model
from medvit_explain.explainers.cdam import CDAM, IntegratedCDAM, SmoothCDAM
from medvit_explain.explainers.display import normalize_for_display, upsample
from medvit_explain.explainers.gradcam import GradCAM
from medvit_explain.explainers.pixel import InputXGradient, IntegratedGradients, SmoothGrad
from medvit_explain.registry import COMMON_OPTIONS, METHODS, list_methods

__all__ = [
    "EXPLAINERS",
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

EXPLAINERS: dict[str, type[Explainer]] = {
    cls.name: cls
    for cls in (
        CDAM,
        SmoothCDAM,
        IntegratedCDAM,
        AGCAM,
        Attention,
        Rollout,
        Chefer,
        GradCAM,
        IntegratedGradients,
        SmoothGrad,
        InputXGradient,
    )
}
assert set(EXPLAINERS) == set(METHODS), "registry and explainer classes disagree"

_POSITIVE_INT = {"n_samples": 1, "n_steps": 1, "internal_batch_size": 1}


def _check_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    info = METHODS[method]
    accepted = {**COMMON_OPTIONS, **info.options}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise MethodError(
            f"method {method!r} does not accept option(s) {', '.join(unknown)}; "
            f"expected one of: {', '.join(sorted(accepted)) or '(none)'}"
        )
    opts = {**accepted, **options}
    for key, low in _POSITIVE_INT.items():
        value = opts.get(key)
        if (
            key in options
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int) or value < low)
        ):
            raise MethodError(f"option {key} expected an integer >= {low}, got {value!r}")
    if method == "cdam-integrated" and opts["n_steps"] < 2:
        raise MethodError(f"option n_steps expected an integer >= 2 for cdam-integrated, got {opts['n_steps']}")
    if "pool" in opts and opts["pool"] not in ("sum", "mean"):
        raise MethodError(f"option pool expected 'sum' or 'mean', got {opts['pool']!r}")
    for key in ("noise_level",):
        if key in opts and (not isinstance(opts[key], (int, float)) or opts[key] < 0):
            raise MethodError(f"option {key} expected a number >= 0, got {opts[key]!r}")
    return opts


def explain(model: nn.Module, images: Tensor, method: str, targets: Any = None, **options: Any) -> Tensor:
    """Explain ``model``'s outputs on ``images`` [B, C, H, W] with ``method``.

    ``targets``: names or indices into ``model.targets`` (``None`` = all), kept in the order given.
    Returns raw signed maps [B, T, gh, gw] on the model's patch grid (float32 unless the model is not).
    ``concept=example_images`` (class-sensitive methods) explains s(x) = q(x)·c̄ instead, T = 1.
    Raises ``MethodError`` (unknown method / option), ``TargetError``, ``ImageShapeError``,
    ``ModelNotSupportedError``.
    """
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
    opts = _check_options(method, options)
    spec = inspect_model(model)
    check_images(images, spec)
    return EXPLAINERS[method](model, spec, opts)(images, targets)


def explain_many(
    model: nn.Module,
    images: Tensor,
    methods: Sequence[str],
    targets: Any = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Tensor]:
    """Several methods on the same images: ``{method: [B, T, gh, gw]}``, each equal to
    ``explain(model, images, method, targets, **options[method])``.

    CDAM and AG-CAM share one no-grad forward when both are asked for (and neither explains a concept
    or uses a different autocast): the cost of both is then about one forward plus their two small
    backward passes. Every other method runs on its own.
    """
    options = options or {}
    for m in methods:
        if m not in METHODS:
            raise MethodError(f"unknown method {m!r}; expected one of: {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise MethodError(f"options given for method(s) not asked for: {', '.join(unknown)}")
    opts = {m: _check_options(m, dict(options.get(m, {}))) for m in methods}
    spec = inspect_model(model)
    check_images(images, spec)
    out: dict[str, Tensor] = {}
    if _can_share(opts):
        agcam, cdam = AGCAM(model, spec, opts["agcam"]), EXPLAINERS["cdam"](model, spec, opts["cdam"])
        with agcam.session(images, targets) as (x, target_idx):
            a_map, c_map = agcam_with_cdam(agcam, cdam, x, target_idx)
        out["agcam"], out["cdam"] = a_map.detach().to(x.dtype), c_map.detach().to(x.dtype)
    for m in methods:
        if m not in out:
            out[m] = EXPLAINERS[m](model, spec, opts[m])(images, targets)
    return {m: out[m] for m in methods}


def _can_share(opts: dict[str, dict[str, Any]]) -> bool:
    if "cdam" not in opts or "agcam" not in opts:
        return False
    c, a = opts["cdam"], opts["agcam"]
    return c.get("concept") is None and a.get("concept") is None and c["autocast_dtype"] == a["autocast_dtype"]
