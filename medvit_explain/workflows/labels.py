"""Slice and nodule labels of a labelled study (shared by ``train``, ``evaluate`` and ``audit``).

A slice is labelled from the nodules whose cross-section in it is at least ``min_area_mm2``
(malignancy = max over them; biomarkers of the largest); slices that only graze a nodule (smaller
cross-sections) are ambiguous and left out; the other slices are negatives with no biomarker labels.
A nodule ROI (ROI mode) is labelled with its own nodule's targets (:func:`nodule_targets`), centred on
its ``center_mm`` or, where the labels do not give one, on the centroid of its label in the mask
(:func:`nodule_centres`, the centre ``--roi-mask`` takes at inference).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import MedvitInputError
from .studies import Study

__all__ = [
    "BIOMARKER_KEYS",
    "load_labelled_study",
    "lung_mask_path",
    "nodule_centres",
    "nodule_targets",
    "read_nodules",
    "slice_targets",
]

BIOMARKER_KEYS = {"diameter": "diameter_mm"}  # target name -> label key where they differ


def lung_mask_path(image: str | Path) -> Path | None:
    """``<name>_lungs.nii.gz`` beside ``<name>.nii.gz`` (as ``make-phantom`` writes it), if present."""
    image = Path(image)
    name = image.name[:-7] if image.name.endswith(".nii.gz") else image.stem
    path = image.with_name(f"{name}_lungs.nii.gz")
    return path if path.exists() else None


def read_nodules(study: Study) -> list[dict]:
    """The ``nodules`` list of the study's labels JSON; MedvitInputError when it cannot be read."""
    try:
        return json.loads(Path(study.labels).read_text())["nodules"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MedvitInputError(f"{study.labels}: expected a JSON file with a 'nodules' list ({exc})") from None


def load_study_volumes(study: Study):
    """The CT and its nodule mask (checked to share the CT's grid)."""
    from ..io import load_volume

    volume = load_volume(study.path)
    mask = load_volume(study.nodule_mask)
    if not mask.same_grid(volume, atol=1e-3):
        raise MedvitInputError(f"{study.nodule_mask} is not on the grid of {study.path}")
    return volume, mask


def pixel_area_mm2(volume, ornt: np.ndarray) -> float:
    """The area of one pixel of a canonical slice (``ornt`` from the slice preprocessing)."""
    axis_of = np.argsort(ornt[:, 0])
    return float(volume.spacing[axis_of[0]] * volume.spacing[axis_of[1]])


def slice_targets(
    task_spec, nodules: list[dict], mask_canon: np.ndarray, pixel_area_mm2: float, min_area_mm2: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per canonical slice: targets [Z, K] (normalised, NaN = unlabelled), labelled [Z] bool,
    has_nodule [Z] bool."""
    by_id = {int(n["id"]): n for n in nodules}
    Z = mask_canon.shape[2]
    raw = np.full((Z, len(task_spec)), np.nan, np.float64)
    labelled = np.ones(Z, bool)
    has_nodule = np.zeros(Z, bool)
    ids = np.array(sorted(by_id), dtype=np.int64)
    for z in range(Z):
        plane = mask_canon[:, :, z]
        counts = np.bincount(plane.ravel().astype(np.int64), minlength=int(ids.max(initial=0)) + 1)
        present = [(int(i), counts[i] * pixel_area_mm2) for i in ids if counts[i] > 0]
        big = [(i, a) for i, a in present if a >= min_area_mm2]
        if present and not big:
            labelled[z] = False  # a slice that only grazes a nodule: ambiguous
            continue
        _label_slice(raw[z], task_spec, by_id, big)
        has_nodule[z] = bool(big)
    targets = np.asarray(task_spec.normalize(raw), dtype=np.float32)
    return targets, labelled, has_nodule


def _label_slice(raw: np.ndarray, task_spec, by_id: dict[int, dict], big: list[tuple[int, float]]) -> None:
    """Fill one slice's raw targets [K]: binary = max over the nodules ``big`` (0 without one),
    regression = the largest nodule's value (left NaN without a nodule)."""
    for k, target in enumerate(task_spec):
        if target.probability:
            raw[k] = max((float(by_id[i].get(target.name, 0)) for i, _ in big), default=0.0)
    if not big:
        return
    largest = by_id[max(big, key=lambda t: t[1])[0]]
    for k, target in enumerate(task_spec):
        if target.kind == "regression":
            key = BIOMARKER_KEYS.get(target.name, target.name)
            if key in largest:
                raw[k] = float(largest[key])


def load_labelled_study(study: Study, model, min_area_mm2: float):
    """One study's slice preprocessing and labels: ``(inputs, mask, nodules, targets [Z, K], labelled [Z],
    has_nodule [Z])`` per canonical slice (see :func:`slice_targets`)."""
    from ..prediction import model_inputs
    from ..transforms import reoriented_view

    volume, mask = load_study_volumes(study)
    nodules = read_nodules(study)
    inputs = model_inputs(model, volume)  # the slices, as every command gets them
    targets, labelled, has_nodule = slice_targets(
        model.task_spec,
        nodules,
        reoriented_view(mask.array, inputs.ornt),
        pixel_area_mm2(volume, inputs.ornt),
        min_area_mm2,
    )
    return inputs, mask, nodules, targets, labelled, has_nodule


def nodule_targets(task_spec, nodules: list[dict]) -> np.ndarray:
    """[M, K] normalised targets of each nodule (its malignancy and biomarkers; NaN where a label is
    missing): what an ROI centred on it is trained to predict."""
    raw = np.full((len(nodules), len(task_spec)), np.nan, np.float64)
    for m, nodule in enumerate(nodules):
        _label_slice(raw[m], task_spec, {int(nodule["id"]): nodule}, [(int(nodule["id"]), 1.0)])
    return np.asarray(task_spec.normalize(raw), dtype=np.float32).reshape(len(nodules), len(task_spec))


def nodule_centres(nodules: list[dict], mask) -> np.ndarray:
    """[M, 3] LPS mm centre of each nodule: its ``center_mm``, else the centroid of its label in ``mask``
    (a :class:`~medvit_explain.volume.Volume`); MedvitInputError for a nodule with neither."""
    from ..transforms import centers_from_mask

    centroids: dict[int, np.ndarray] | None = None
    out = np.zeros((len(nodules), 3))
    for m, nodule in enumerate(nodules):
        if nodule.get("center_mm") is not None:
            out[m] = np.asarray(nodule["center_mm"], dtype=np.float64).reshape(3)
            continue
        if centroids is None:
            centres, labels = centers_from_mask(mask)
            centroids = dict(zip(labels, centres, strict=True))
        if int(nodule["id"]) not in centroids:
            raise MedvitInputError(f"nodule {nodule['id']} has no center_mm and no voxel in the nodule mask")
        out[m] = centroids[int(nodule["id"])]
    return out
