"""Evaluation of an ROI-mode model (``medvit-explain evaluate`` with a nodule-ROI model).

Every labelled nodule of ``data`` (a phantom folder or a manifest; centres from the labels JSON) is cut
into the model's views exactly as ``explain --roi-centers`` cuts it. The model is scored per nodule, its
views' outputs averaged (as the ``mean`` row of ``predictions.csv``): malignancy ROC AUC and accuracy at
0.5, the MAE of each biomarker on its scale. Each method then explains every view for every target, and
:mod:`.target_localization` measures where each biomarker's map puts its positive evidence on the nodule's
ground-truth parts (``<name>_features.nii.gz``), against the malignancy map.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import MedvitInputError
from ..metrics.masks import roi_masks
from ..vocabulary import primary_target
from .labels import load_study_volumes, nodule_centres, nodule_targets, read_nodules
from .scores import model_outputs, nodule_scores
from .studies import find_studies
from .target_localization import TARGET_FEATURE, item_shares, load_features, summarise_shares

__all__ = ["RoiEvaluationResult", "RoiViews", "evaluate_roi_explanations", "load_roi_views"]


@dataclass
class RoiViews:
    """The views of every labelled nodule: ``images`` [N, C, H, W] (nodule-major, ``n_views`` per nodule),
    ``truth`` [R, K] each nodule's targets, normalised (NaN = unlabelled), ``features`` [N, H, W] the
    feature labels of each view (None where a study has no features map: all zero), ``has_features`` [N]."""

    images: torch.Tensor
    truth: np.ndarray
    features: np.ndarray
    has_features: np.ndarray
    n_views: int
    n_studies: int


def load_roi_views(studies, model, progress: bool = True) -> RoiViews:
    """Every labelled nodule's views, truth and feature labels (see :class:`RoiViews`)."""
    from tqdm.auto import tqdm

    from ..prediction import model_inputs

    images, truth, features, has_features = [], [], [], []
    n_views = 0
    for study in tqdm(studies, desc="loading", unit="study", disable=not progress, leave=False):
        nodules = read_nodules(study)
        if not nodules:
            continue
        volume, mask = load_study_volumes(study)
        inputs = model_inputs(model, volume, roi_centers=nodule_centres(nodules, mask))
        n_views = len(inputs.views)
        images.append(inputs.images())
        truth.append(nodule_targets(model.task_spec, nodules))
        feats = load_features(study.path, volume)
        if feats is None:
            features.append(np.zeros((inputs.n_inputs, *inputs.image_size), np.uint8))
            has_features.append(np.zeros(inputs.n_inputs, bool))
        else:
            features.append(roi_masks(feats.array.astype(np.uint8), inputs))
            has_features.append(np.ones(inputs.n_inputs, bool))
    if not images:
        raise MedvitInputError("no labelled nodule found in the evaluation data (expected nodules[].center_mm)")
    return RoiViews(
        torch.cat(images),
        np.concatenate(truth),
        np.concatenate(features),
        np.concatenate(has_features),
        n_views,
        len(studies),
    )


@dataclass
class RoiEvaluationResult:
    """What ``evaluate`` measured for an ROI model; :attr:`metrics` is what ``metrics.json`` holds."""

    model: dict[str, Any]
    targets: list[str]
    target_localization: dict[str, dict[str, dict[str, Any]]]  # method -> target -> own / malignancy / area / n
    counts: dict[str, int]
    settings: dict[str, Any]
    timings_s: dict[str, float]
    total_seconds: float
    methods: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return {
            "mode": "roi",
            "model": self.model,
            **self.counts,
            "methods": self.methods,
            "targets": self.targets,
            "target_localization": self.target_localization,
            "timings_s": self.timings_s,
            "settings": self.settings,
            "total_seconds": self.total_seconds,
        }


def evaluate_roi_explanations(
    model, data, methods: Sequence[str], targets=None, *, batch_size: int = 16, progress: bool = True
) -> RoiEvaluationResult:
    """Nodule-level model scores and every method's target-specific localization (module docstring).

    Args:
        model: a loaded ROI-mode model.
        data: a phantom folder or a manifest CSV with labels (nodule centres) and, for the localization,
            ``<name>_features.nii.gz`` beside each image.
        methods: method names; targets: target names / indices (default: all).
    """
    from tqdm.auto import tqdm

    from ..explainers import explain, upsample
    from ..registry import explainer_class

    for method in methods:
        explainer_class(method)  # MethodError for an unknown name, before any work
    spec = model.task_spec
    target_idx = spec.resolve(targets)
    names = [spec.names[i] for i in target_idx]
    primary = spec.names[primary_target(spec.names, spec.score_kinds)]
    if primary not in names:
        target_idx, names = [*target_idx, spec.names.index(primary)], [*names, primary]
    model.eval()
    t0 = time.perf_counter()
    views = load_roi_views(find_studies(data), model, progress)
    scores = nodule_scores(spec, model_outputs(model, views.images).numpy(), views.truth, views.n_views)
    measured = np.flatnonzero(views.has_features)
    localization, timings = {}, {}
    bar = tqdm(total=len(methods), desc="evaluate", unit="method", disable=not progress, leave=False)
    device = next(model.parameters()).device
    for method in methods:
        t_method = time.perf_counter()
        shares = []
        for i in range(0, len(measured) if any(n in TARGET_FEATURE for n in names) else 0, batch_size):
            batch = measured[i : i + batch_size]
            x = views.images[batch].to(device)
            maps = upsample(explain(model, x, method, targets=target_idx).float(), x.shape[2:]).cpu()
            shares.append(item_shares(maps, views.features[batch], names, primary))
        if shares:
            localization[method] = summarise_shares(shares, primary)
        timings[method] = round(time.perf_counter() - t_method, 2)
        bar.update(1)
    bar.close()
    model_block = {
        "malignancy_auc": scores.get(f"{primary}_auc"),
        "malignancy_accuracy": scores.get(f"{primary}_accuracy"),
        "malignancy_auc_views": scores.get(f"{primary}_auc_views"),
        "biomarker_mae": scores.get("mae", {}),
        "unit": "nodule (outputs of its views averaged)",
    }
    counts = {
        "n_studies": views.n_studies,
        "n_nodules": int(len(views.truth)),
        "n_views": int(len(views.images)),
        "n_views_with_features": int(len(measured)),
    }
    settings = {"batch_size": batch_size, "device": str(device), "data": str(data), "reference_target": primary}
    total = round(time.perf_counter() - t0, 1)
    return RoiEvaluationResult(model_block, names, localization, counts, settings, timings, total, list(methods))
