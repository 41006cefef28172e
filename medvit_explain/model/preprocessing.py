"""The preprocessing dict a checkpoint carries (consumed by ``medvit_explain.transforms``).

Schema (every key has a default)::

    {"mode": "slice" | "roi",          # every axial slice, or nodule-centred crops
     "image_size": [H, W],             # model input size (must equal the backbone's)
     "in_chans": C,                    # model input channels (must equal the backbone's)
     "hu_window": [lo, hi],            # HU clamp, then scaled linearly to scale_to
     "scale_to": [a, b],               # model input range of the window (default [0, 1])
     "crop_body": bool,                # slice mode: crop each slice to the body first
     "body_threshold_hu": -500,        # HU threshold that separates body from air
     "roi": {"size_mm": 32, "spacing_mm": 1.0, "views": ["axial", "coronal", "sagittal"]}}
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from medvit_explain.errors import CheckpointError

MODES = ("slice", "roi")
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
}


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"preprocessing: expected a finite number for {what}, got {value!r}")
    return float(value)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"preprocessing: expected a positive integer for {what}, got {value!r}")
    return value


def default_preprocessing(input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """The default dict; ``input_size = (C, H, W)`` fills ``in_chans`` and ``image_size``."""
    out = copy.deepcopy(DEFAULT_PREPROCESSING)
    if input_size is not None:
        c, h, w = input_size
        out["in_chans"], out["image_size"] = int(c), [int(h), int(w)]
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

    if out["mode"] not in MODES:
        raise CheckpointError(f"preprocessing: expected mode 'slice' or 'roi', got {out['mode']!r}")
    size = out["image_size"]
    if size is None:
        raise CheckpointError("preprocessing: expected image_size [H, W], got nothing")
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if not isinstance(size, Sequence) or isinstance(size, str) or len(size) != 2:
        raise CheckpointError(f"preprocessing: expected image_size [H, W], got {size!r}")
    out["image_size"] = [_positive_int(s, "image_size") for s in size]
    if out["in_chans"] is None:
        raise CheckpointError("preprocessing: expected in_chans, got nothing")
    out["in_chans"] = _positive_int(out["in_chans"], "in_chans")
    window = out["hu_window"]
    if not isinstance(window, Sequence) or isinstance(window, str) or len(window) != 2:
        raise CheckpointError(f"preprocessing: expected hu_window [lo, hi], got {window!r}")
    lo, hi = (_finite(v, "hu_window") for v in window)
    if not lo < hi:
        raise CheckpointError(f"preprocessing: expected hu_window lo < hi, got {window!r}")
    out["hu_window"] = [lo, hi]
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

    if input_size is not None:
        c, h, w = (int(v) for v in input_size)
        if out["in_chans"] != c or out["image_size"] != [h, w]:
            raise CheckpointError(
                f"preprocessing does not match the model: expected in_chans {c} and image_size [{h}, {w}] "
                f"(from the backbone), got in_chans {out['in_chans']} and image_size {out['image_size']}"
            )
    return out
