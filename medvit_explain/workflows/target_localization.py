"""Target-specific localization: does a biomarker's map point at that biomarker's own feature?

The phantoms come with ground truth for the nodules' parts (``<name>_features.nii.gz``, see
``sample_data/README.md``): 1 solid core, 2 spicules, 3 lobulation bumps, 4 calcification, 5 ground-glass
component. Four targets have a part of their own (:data:`TARGET_FEATURE`): spiculation → spicules,
lobulation → lobulation bumps, calcification → calcification, texture → ground glass.

The evidence *for a part* is the map's evidence in the direction in which that part moves the score
(:data:`FEATURE_SIGN`): spicules and lobulation raise the spiculation / lobulation scores (1 = none,
5 = marked), so it is the map's positive part; calcification *lowers* its score (LIDC: 1–5 are calcification
patterns, 6 = absent) and ground glass lowers texture (1 = ground glass, 5 = solid), so for those two it is
the map's negative part (the map is negated before the positive part is taken). Without the sign the
measure would reward a texture map for pointing at the solid core. A method whose maps are never negative
(AG-CAM, attention, rollout, ...) encodes no direction: its relevance is taken as it is for every target.

For one model input (an ROI view, or a nodule slice) and a map ``m`` (token grid, bilinearly upsampled
to the input, as every measure here), the **share of positive evidence on label L** is

    share_L(m) = Σ_{p : f(p) = L} max(m(p), 0)  /  Σ_{p : f(p) > 0} max(m(p), 0)

the part of the map's positive evidence *on the nodule* that lies on feature ``L`` (the rest lies on the
nodule's other labels). For each target ``t`` with a feature ``L = L(t)`` (its map taken times its
:data:`FEATURE_SIGN`), over the inputs where ``L`` is present and the map has positive evidence on the
nodule:

* ``own``: mean share_L(m_t), the target's own map;
* ``malignancy``: mean share_L(m_malignancy) on the same inputs (the malignancy map's evidence *for*
  malignancy, unsigned): the class-discriminative claim is ``own > malignancy`` (a map for spiculation
  should sit on the spicules more than the malignancy map does);
* ``area``: mean fraction of the nodule's pixels that carry ``L`` — the share of a map that is uniform over
  the nodule (chance level);
* ``n``: the number of inputs measured.

Class-agnostic methods give one map for every target, so for them ``own`` equals ``malignancy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FEATURES = {1: "core", 2: "spicules", 3: "lobulation", 4: "calcification", 5: "ground_glass"}
TARGET_FEATURE = {"spiculation": 2, "lobulation": 3, "calcification": 4, "texture": 5}
FEATURE_SIGN = {"spiculation": 1.0, "lobulation": 1.0, "calcification": -1.0, "texture": -1.0}

__all__ = [
    "FEATURES",
    "FEATURE_SIGN",
    "TARGET_FEATURE",
    "evidence_shares",
    "features_path",
    "load_features",
    "item_shares",
    "summarise_shares",
]


def features_path(image: str | Path) -> Path | None:
    """``<name>_features.nii.gz`` beside ``<name>.nii.gz`` (as ``make-phantom`` writes it), if present."""
    image = Path(image)
    name = image.name[:-7] if image.name.endswith(".nii.gz") else image.stem
    path = image.with_name(f"{name}_features.nii.gz")
    return path if path.exists() else None


def load_features(image: str | Path, volume):
    """The nodule-part labels beside ``image`` (:func:`features_path`) as a volume on ``volume``'s grid, or
    None when there are none; MedvitInputError when they are on another grid."""
    from ..errors import MedvitInputError
    from ..io import load_volume

    path = features_path(image)
    if path is None:
        return None
    features = load_volume(path)
    if not features.same_grid(volume, atol=1e-3):
        raise MedvitInputError(f"{path} is not on the grid of {image}")
    return features


def evidence_shares(maps: torch.Tensor | np.ndarray, features: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """Per input: ``share_label(map)`` (NaN where ``label`` is absent or the map has no positive evidence on
    the nodule) and the area share of ``label`` among the nodule's pixels (NaN where absent).

    Args:
        maps: [N, H, W] maps at input resolution ([N, D, H, W] for a volumetric model's cubes).
        features: [N, H, W] (or [N, D, H, W]) feature labels (0 outside the nodules).
        label: the feature label L.
    """
    maps = np.asarray(maps.detach().cpu() if torch.is_tensor(maps) else maps, dtype=np.float64)
    features = np.asarray(features)
    positive = np.maximum(maps, 0.0)
    on_nodule = features > 0
    on_label = features == label
    axes = tuple(range(1, maps.ndim))
    total = (positive * on_nodule).sum(axis=axes)
    own = (positive * on_label).sum(axis=axes)
    present = on_label.any(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(present & (total > 0), own / total, np.nan)
        area = np.where(present, on_label.sum(axis=axes) / np.maximum(on_nodule.sum(axis=axes), 1), np.nan)
    return share, area


def item_shares(
    maps: torch.Tensor, features: np.ndarray, target_names: Sequence[str], reference: str = "malignancy"
) -> dict[str, dict[str, np.ndarray]]:
    """Per input, for every target of ``target_names`` with a feature of its own: ``own`` (its map's share
    on its feature), ``reference`` (the ``reference`` target's map's share on the same feature) and ``area``
    (NaN where not measurable). Computed batch by batch; :func:`summarise_shares` averages the concatenation.

    Args:
        maps: [N, T, H, W] maps at input resolution, targets in the order of ``target_names``.
        features: [N, H, W] feature labels of the same inputs.
    """
    names = list(target_names)
    if reference not in names:
        raise ValueError(f"expected the reference target {reference!r} among the targets {names}")
    ref = names.index(reference)
    out: dict[str, dict[str, np.ndarray]] = {}
    for t, name in enumerate(names):
        label = TARGET_FEATURE.get(name)
        if label is None:
            continue
        signed, area = evidence_shares(maps[:, t] * FEATURE_SIGN[name], features, label)
        unsigned, _ = evidence_shares(maps[:, t], features, label)
        against, _ = evidence_shares(maps[:, ref], features, label)
        out[name] = {"own": signed, "own_unsigned": unsigned, reference: against, "area": area}
    out["_min"] = {"value": np.asarray([float(maps.min()) if maps.numel() else 0.0])}
    return out


def summarise_shares(shares: Sequence[dict[str, dict[str, np.ndarray]]], reference: str = "malignancy") -> dict:
    """``{target: {feature, own, <reference>, area, n, signed}}``: the means over the inputs where both maps
    have positive evidence on a nodule that shows the feature, from the per-batch :func:`item_shares`. The
    maps count as signed (and :data:`FEATURE_SIGN` applies) when any of them has a negative value."""
    signed = bool(shares) and min(float(batch["_min"]["value"][0]) for batch in shares) < 0
    out: dict[str, dict[str, Any]] = {}
    for name in [n for n in (shares[0] if shares else ()) if n != "_min"]:
        own = np.concatenate([batch[name]["own" if signed else "own_unsigned"] for batch in shares])
        against = np.concatenate([batch[name][reference] for batch in shares])
        area = np.concatenate([batch[name]["area"] for batch in shares])
        valid = np.isfinite(own) & np.isfinite(against)
        out[name] = {
            "feature": FEATURES[TARGET_FEATURE[name]],
            "own": _mean(own[valid]),
            reference: _mean(against[valid]),
            "area": _mean(area[valid]),
            "n": int(valid.sum()),
            "signed": signed,
        }
    return out


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None
