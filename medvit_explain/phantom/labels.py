"""Labels of the phantoms: per-slice training labels, the labels JSON, reading nodule masks."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..volume import Volume
from .generate import Phantom
from .nodules import BIOMARKER_KEYS


def _labels_json(phantom: Phantom) -> dict[str, Any]:
    ct = phantom.ct
    return {
        "nodules": phantom.nodules,
        "seed": phantom.seed,
        "size": list(ct.shape),
        "spacing": [float(v) for v in ct.spacing],
        "origin": [float(v) for v in ct.origin],
        "direction": [[float(v) for v in row] for row in ct.direction],
        "label_noise": phantom.label_noise,
        "generator_version": phantom.generator_version,
        "malignancy_rule": "medvit_explain.phantom.malignancy_rule",
    }


def _read_mask(mask: Any) -> np.ndarray:
    if isinstance(mask, Volume):
        return np.asarray(mask.array)
    if isinstance(mask, (str, os.PathLike)):
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(sitk.ReadImage(str(mask))).transpose(2, 1, 0)
    return np.asarray(mask)


def _mask_spacing(mask_vol: Any, spacing: Sequence[float] | None, labels_json: Mapping[str, Any]) -> np.ndarray:
    """Voxel spacing of a nodule mask: ``spacing`` if given, else the mask's own, else the JSON's (or 1 mm)."""
    if spacing is not None:
        return np.asarray(spacing, dtype=np.float64)
    if isinstance(mask_vol, Volume):
        return mask_vol.spacing
    if isinstance(mask_vol, (str, os.PathLike)):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(mask_vol))
        reader.ReadImageInformation()
        return np.asarray(reader.GetSpacing(), dtype=np.float64)
    return np.asarray(labels_json.get("spacing", (1.0, 1.0, 1.0)), dtype=np.float64)


def slice_labels(
    source: Phantom | Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike,
    nodule_mask: Volume | np.ndarray | str | os.PathLike | None = None,
    *,
    min_area_mm2: float = 0.0,
    spacing: Sequence[float] | None = None,
) -> list[dict[str, Any] | None]:
    """Per axial slice ``k`` of the grid, the nodules present and the slice's training labels.

    Args:
        source: a ``Phantom``; or the labels JSON (its path, its loaded dict, or the nodule list),
            together with ``nodule_mask``.
        nodule_mask: instance-id mask ``[X, Y, Z]`` (``Volume``, array, or a NIfTI path).
        min_area_mm2: a nodule counts in a slice only if its cross-section is at least this large.
        spacing: voxel spacing when ``nodule_mask`` is a bare array (default: from the JSON or 1 mm).

    Returns:
        A list of length Z: ``None`` for a slice without nodules, else a dict with ``k``,
        ``nodule_ids`` (ascending), ``areas_mm2`` (same order), ``malignancy`` (max over the nodules
        present), ``largest_id`` and the biomarkers of the largest-area nodule in that slice
        (``subtlety, calcification, margin, lobulation, spiculation, texture, sphericity,
        diameter_mm``).
    """
    labels_json: Mapping[str, Any] = {}
    if isinstance(source, Phantom):
        nodules = source.nodules
        mask_vol: Any = source.nodule_mask if nodule_mask is None else nodule_mask
    else:
        if isinstance(source, (str, os.PathLike)):
            labels_json = json.loads(Path(source).read_text())
            nodules = labels_json["nodules"]
        elif isinstance(source, Mapping):
            labels_json = source
            nodules = source["nodules"]
        else:
            nodules = list(source)
        if nodule_mask is None:
            raise ValueError("expected a nodule_mask with JSON labels, got None")
        mask_vol = nodule_mask
    sp = _mask_spacing(mask_vol, spacing, labels_json)
    mask = _read_mask(mask_vol)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D [X, Y, Z] nodule mask, got shape {mask.shape}")
    by_id = {int(n["id"]): n for n in nodules}
    pixel_mm2 = float(sp[0] * sp[1])
    n_ids = int(mask.max()) + 1 if mask.size else 1
    out: list[dict[str, Any] | None] = []
    for k in range(mask.shape[2]):
        counts = np.bincount(mask[:, :, k].ravel().astype(np.int64), minlength=n_ids)
        present = [
            (i, counts[i] * pixel_mm2)
            for i in range(1, len(counts))
            if counts[i] > 0 and counts[i] * pixel_mm2 >= min_area_mm2 and i in by_id
        ]
        if not present:
            out.append(None)
            continue
        largest = max(present, key=lambda t: (t[1], -t[0]))[0]
        rec: dict[str, Any] = {
            "k": k,
            "nodule_ids": [i for i, _ in present],
            "areas_mm2": [round(float(a), 3) for _, a in present],
            "malignancy": max(int(by_id[i]["malignancy"]) for i, _ in present),
            "largest_id": largest,
        }
        rec.update({key: by_id[largest][key] for key in BIOMARKER_KEYS})
        out.append(rec)
    return out
