"""The preprocessing dict a checkpoint carries (consumed by ``medvit_explain.transforms``).

Schema (every key has a default)::

    {"mode": "slice" | "roi" | "volume",  # every axial slice, nodule-centred crops, the whole volume (3D)
     "image_size": [H, W],             # model input size (must equal the backbone's; [D, H, W] in 3D)
     "in_chans": C,                    # model input channels (must equal the backbone's)
     "hu_window": [lo, hi],            # HU clamp, then scaled linearly to scale_to
     "scale_to": [a, b],               # model input range of the window (default [0, 1])
     "crop_body": bool,                # slice mode: crop each slice to the body first
     "body_threshold_hu": -500,        # HU threshold that separates body from air
     "roi": {"size_mm": 32, "spacing_mm": 1.0, "views": ["axial", "coronal", "sagittal"]},
     "channels": {"recipe": "copies"}, # what each of the in_chans input channels holds (below)
     "mean": null, "std": null}        # per-channel normalisation after the window (below)

Channel recipes (``channels``; ``recipe`` picks one, its other keys are required):

* ``{recipe: copies}`` (default): every channel is the same plane, windowed with ``hu_window``.
* ``{recipe: hu_windows, windows: [[lo, hi], ...]}``: channel c is the plane through window c (clamped and
  scaled to ``scale_to`` like ``hu_window``), one window per channel (``len(windows) == in_chans``); the
  top-level ``hu_window`` is then not used for the model inputs.
* ``{recipe: adjacent_slices, offsets: [-1, 0, 1]}``: channel c is the neighbouring plane k + offsets[c]
  (clamped at the volume's ends, so edge slices repeat), windowed with ``hu_window``; integers, one per
  channel, 0 among them (the plane the map is written back to). Slice mode: canonical axial slices; ROI
  mode: planes of the ROI cube along the view's normal, one cube sample (``spacing_mm``) apart.

Volumetric models (``image_size [D, H, W]``, ``architecture.patch_embed: conv3d``): mode ``roi`` (the
default for them) gives each nodule's whole cube as one input, mode ``volume`` the whole CT resampled to
the model's box (``crop_body`` crops it to the body first); ``slice`` and ``adjacent_slices`` are 2D only,
``roi.views`` is not used.

``mean`` / ``std``: ``x_c = (x_c - mean[c]) / std[c]`` on the windowed, ``scale_to``-scaled, resized
inputs (e.g. ImageNet's ``[0.485, 0.456, 0.406]`` / ``[0.229, 0.224, 0.225]`` with ``scale_to [0, 1]``).
Each a number (every channel) or ``in_chans`` numbers, ``std > 0``; null (default) = no normalisation.
Setting one fills the other with the identity (mean 0 / std 1). The validated dict writes both out as
``in_chans``-long lists (or null) and the recipe in full.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from medvit_explain.errors import CheckpointError

MODES = ("slice", "roi", "volume")
MODES_3D = ("roi", "volume")
VIEWS = ("axial", "coronal", "sagittal")

DEFAULT_PREPROCESSING: dict[str, Any] = {
    "mode": "slice",
    "image_size": None,  # filled from the model
    "in_chans": None,  # filled from the model
    "hu_window": [-1000.0, 400.0],
    "scale_to": [0.0, 1.0],
    "crop_body": True,
    "body_threshold_hu": -500.0,
    "roi": {"size_mm": 32.0, "spacing_mm": 1.0, "views": list(VIEWS)},
    "channels": {"recipe": "copies"},
    "mean": None,  # no normalisation
    "std": None,
}
# each recipe's keys besides ``recipe`` (all required) and an example of them, for the error messages
RECIPES: dict[str, dict[str, str]] = {
    "copies": {},
    "hu_windows": {"windows": "[[-1000, 400], [-160, 240], [-1400, -200]]"},
    "adjacent_slices": {"offsets": "[-1, 0, 1]"},
}


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"preprocessing: expected a finite number for {what}, got {value!r}")
    return float(value)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"preprocessing: expected a positive integer for {what}, got {value!r}")
    return value


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _per_channel(value: Any, n: int, what: str) -> list[float]:
    """A number or ``n`` numbers → ``n`` floats (``what`` names the key in the messages)."""
    if not _is_list(value):
        return [_finite(value, what)] * n
    if len(value) != n:
        raise CheckpointError(
            f"preprocessing: expected {what} as one number or {n} numbers (one per input channel, in_chans {n}), "
            f"got {len(value)}: {list(value)!r}"
        )
    return [_finite(v, what) for v in value]


def _normalisation(out: dict[str, Any]) -> None:
    """``mean`` / ``std`` → ``in_chans``-long lists (the missing one the identity), or both None."""
    n = out["in_chans"]
    if out["mean"] is None and out["std"] is None:
        return
    out["mean"] = [0.0] * n if out["mean"] is None else _per_channel(out["mean"], n, "mean")
    out["std"] = [1.0] * n if out["std"] is None else _per_channel(out["std"], n, "std")
    if any(s <= 0 for s in out["std"]):
        raise CheckpointError(f"preprocessing: expected std > 0 for every channel, got {out['std']}")


def _channels(value: Any, n: int) -> dict[str, Any]:
    """The channel recipe written out in full (see the module docstring), checked against ``in_chans`` ``n``."""
    recipe = {"recipe": value} if isinstance(value, str) else value
    usage = "; ".join(
        f"{{recipe: {name}{''.join(f', {k}: {v}' for k, v in keys.items())}}}" for name, keys in RECIPES.items()
    )
    if not isinstance(recipe, Mapping) or "recipe" not in recipe:
        raise CheckpointError(f"preprocessing: expected channels as one of {usage}; got {value!r}")
    name = recipe["recipe"]
    if name not in RECIPES:
        raise CheckpointError(f"preprocessing: unknown channels recipe {name!r}; expected one of {', '.join(RECIPES)}")
    allowed = ["recipe", *RECIPES[name]]
    unknown = sorted(set(recipe) - set(allowed))
    if unknown:
        raise CheckpointError(f"preprocessing: unknown channels keys {unknown} for recipe {name}; expected {allowed}")
    missing = [k for k in RECIPES[name] if recipe.get(k) is None]
    if missing:
        example = ", ".join(f"{k}: {RECIPES[name][k]}" for k in missing)
        raise CheckpointError(
            f"preprocessing: channels recipe {name} needs {missing}, e.g. {{recipe: {name}, {example}}}"
        )
    if name == "hu_windows":
        windows = recipe["windows"]
        if not _is_list(windows) or len(windows) != n:
            got = f"{len(windows)} windows" if _is_list(windows) else repr(windows)
            raise CheckpointError(
                f"preprocessing: expected channels.windows to hold {n} [lo, hi] windows (one per input channel, "
                f"in_chans {n}), got {got}"
            )
        return {"recipe": name, "windows": [_hu_window(w, "channels.windows") for w in windows]}
    if name == "adjacent_slices":
        offsets = recipe["offsets"]
        if not _is_list(offsets) or len(offsets) != n:
            got = f"{len(offsets)} offsets" if _is_list(offsets) else repr(offsets)
            raise CheckpointError(
                f"preprocessing: expected channels.offsets to hold {n} integers (one per input channel, "
                f"in_chans {n}), e.g. {list(range(-(n // 2), n - n // 2))}, got {got}"
            )
        if any(isinstance(o, bool) or not isinstance(o, int) for o in offsets):
            raise CheckpointError(f"preprocessing: expected integer channels.offsets, got {list(offsets)!r}")
        if 0 not in offsets:
            raise CheckpointError(
                f"preprocessing: expected channels.offsets to include 0 (the slice the map is written back to), "
                f"got {list(offsets)!r}"
            )
        return {"recipe": name, "offsets": [int(o) for o in offsets]}
    return {"recipe": name}


def _hu_window(window: Any, what: str) -> list[float]:
    if not _is_list(window) or len(window) != 2:
        raise CheckpointError(f"preprocessing: expected {what} [lo, hi], got {window!r}")
    lo, hi = (_finite(v, what) for v in window)
    if not lo < hi:
        raise CheckpointError(f"preprocessing: expected {what} lo < hi, got {list(window)!r}")
    return [lo, hi]


def default_preprocessing(input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """The default dict; ``input_size = (C, H, W)`` (or ``(C, D, H, W)``) fills ``in_chans`` and
    ``image_size`` (a volumetric model's default mode is ``roi``)."""
    out = copy.deepcopy(DEFAULT_PREPROCESSING)
    if input_size is not None:
        c, *size = input_size
        out["in_chans"], out["image_size"] = int(c), [int(s) for s in size]
        if len(size) == 3:
            out["mode"] = "roi"
    return out


def validate_preprocessing(
    preprocessing: Mapping[str, Any] | None, input_size: Sequence[int] | None = None
) -> dict[str, Any]:
    """Fill defaults, check types and ranges, and check agreement with the model's ``input_size``
    ``(C, H, W)``. Returns a new, JSON-ready dict; raises :class:`CheckpointError` with one line."""
    given = dict(preprocessing or {})
    unknown = sorted(set(given) - set(DEFAULT_PREPROCESSING))
    if unknown:
        raise CheckpointError(
            f"preprocessing: unknown keys {unknown}; expected keys from {sorted(DEFAULT_PREPROCESSING)}"
        )
    out = default_preprocessing(input_size)
    roi_given = given.pop("roi", None) or {}
    if not isinstance(roi_given, Mapping):
        raise CheckpointError(f"preprocessing: expected 'roi' to be a mapping, got {roi_given!r}")
    unknown = sorted(set(roi_given) - set(out["roi"]))
    if unknown:
        raise CheckpointError(f"preprocessing: unknown roi keys {unknown}; expected {sorted(out['roi'])}")
    out.update({k: v for k, v in given.items() if v is not None})
    out["roi"].update(roi_given)

    size = out["image_size"]
    if size is None:
        raise CheckpointError("preprocessing: expected image_size [H, W], got nothing")
    dims = 2 if input_size is None else len(input_size) - 1
    if input_size is None and isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 3:
        dims = 3
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size] * dims
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != dims:
        raise CheckpointError(
            f"preprocessing: expected image_size {'[D, H, W]' if dims == 3 else '[H, W]'}, got {size!r}"
        )
    modes = MODES_3D if dims == 3 else MODES[:2]
    if out["mode"] not in modes:
        raise CheckpointError(
            f"preprocessing: expected mode {' or '.join(repr(m) for m in modes)}"
            f"{' (a volumetric model)' if dims == 3 else ''}, got {out['mode']!r}"
        )
    out["image_size"] = [_positive_int(s, "image_size") for s in size]
    if out["in_chans"] is None:
        raise CheckpointError("preprocessing: expected in_chans, got nothing")
    out["in_chans"] = _positive_int(out["in_chans"], "in_chans")
    out["hu_window"] = _hu_window(out["hu_window"], "hu_window")
    scale = out["scale_to"]
    if not isinstance(scale, Sequence) or isinstance(scale, str) or len(scale) != 2:
        raise CheckpointError(f"preprocessing: expected scale_to [a, b], got {scale!r}")
    a, b = (_finite(v, "scale_to") for v in scale)
    if not a < b:
        raise CheckpointError(f"preprocessing: expected scale_to a < b, got {scale!r}")
    out["scale_to"] = [a, b]
    if not isinstance(out["crop_body"], bool):
        raise CheckpointError(f"preprocessing: expected crop_body true/false, got {out['crop_body']!r}")
    out["body_threshold_hu"] = _finite(out["body_threshold_hu"], "body_threshold_hu")
    roi = out["roi"]
    for key in ("size_mm", "spacing_mm"):
        roi[key] = _finite(roi[key], f"roi.{key}")
        if roi[key] <= 0:
            raise CheckpointError(f"preprocessing: expected roi.{key} > 0, got {roi[key]}")
    views = roi["views"]
    if isinstance(views, str):
        views = [views]
    if (
        not isinstance(views, Sequence)
        or not views
        or any(v not in VIEWS for v in views)
        or len(set(views)) != len(views)
    ):
        raise CheckpointError(
            f"preprocessing: expected roi.views a non-empty list of distinct {', '.join(VIEWS)}, got {views!r}"
        )
    roi["views"] = list(views)
    out["channels"] = _channels(out["channels"], out["in_chans"])
    if dims == 3 and out["channels"]["recipe"] == "adjacent_slices":
        raise CheckpointError(
            "preprocessing: channels recipe adjacent_slices is for 2D models; a volumetric model sees the "
            "neighbours itself (use copies or hu_windows)"
        )
    _normalisation(out)

    if input_size is not None:
        c, *want = (int(v) for v in input_size)
        if out["in_chans"] != c or out["image_size"] != want:
            raise CheckpointError(
                f"preprocessing does not match the model: expected in_chans {c} and image_size {want} "
                f"(from the backbone), got in_chans {out['in_chans']} and image_size {out['image_size']}"
            )
    return out


def defaults_used(preprocessing_given: Mapping[str, Any] | None) -> list[str]:
    """The settings whose effective value comes from the defaults rather than from ``preprocessing_given``
    (the checkpoint's dict as written), in schema order: a key the dict does not have (a key written as
    null was chosen: e.g. ``mean: null`` = no normalisation). ``image_size`` / ``in_chans`` are never
    listed (they come from the model); ``roi.<key>`` only for an ROI-mode model. E.g.
    ``{image_size, in_chans, hu_window}`` → ``["mode", "scale_to", "crop_body", "body_threshold_hu",
    "channels", "mean", "std"]``."""
    given = dict(preprocessing_given or {})
    roi_given = given.get("roi") if isinstance(given.get("roi"), Mapping) else {}
    used = []
    for key in DEFAULT_PREPROCESSING:
        if key in ("image_size", "in_chans"):
            continue
        if key == "roi":
            if given.get("mode") == "roi":
                used += [f"roi.{k}" for k in DEFAULT_PREPROCESSING["roi"] if k not in roi_given]
        elif key not in given:
            used.append(key)
    return used
