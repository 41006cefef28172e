"""The model's own scores on labelled slices, shared by ``train`` (validation) and ``evaluate``:
ROC AUC, accuracy at 0.5 and MAE on each target's scale."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["model_outputs", "nodule_scores", "output_metrics", "roc_auc", "slice_metrics"]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with tie handling); NaN without both classes."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@torch.no_grad()
def model_outputs(model, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The model's raw outputs [N, K] (float32, on the CPU) for ``images`` [N, C, H, W], in batches."""
    device = next(model.parameters()).device
    return torch.cat(
        [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    )


def slice_metrics(
    model, images: torch.Tensor, targets: torch.Tensor, has_nodule: np.ndarray, batch_size: int = 128
) -> dict[str, Any]:
    """Slice-level ROC AUC and accuracy at 0.5 of each binary target (also on nodule slices only), and
    the MAE on the target's scale of each regression target (labelled slices only), and the number of
    nodule-free slices with a probability above 0.5 (``<target>_false_positives_nodule_free``).

    ``targets`` [N, K] normalised (NaN = unlabelled); keys ``<target>_auc``, ``<target>_accuracy``,
    ``<target>_auc_nodule_slices``, ``mae`` {target: value}, ``n_slices``, ``n_nodule_slices``."""
    outputs = model_outputs(model, images, batch_size).numpy()
    truth = np.asarray(model.task_spec.denormalize(targets.numpy()))
    return output_metrics(model.task_spec, outputs, truth, has_nodule)


def output_metrics(
    spec, outputs: np.ndarray, truth: np.ndarray, has_nodule: np.ndarray | None = None
) -> dict[str, Any]:
    """The metrics of :func:`slice_metrics` from raw model outputs [N, K] and the truth [N, K] on each
    target's scale (NaN = unlabelled), for any unit of scoring (slices, or nodules with their views'
    outputs averaged). ``has_nodule`` [N] (default: all) gives the ``_auc_nodule_slices`` subset."""
    values = np.asarray(spec.to_values(np.asarray(outputs)))
    truth = np.asarray(truth, dtype=np.float64)
    has_nodule = np.ones(len(truth), bool) if has_nodule is None else np.asarray(has_nodule, dtype=bool)
    out: dict[str, Any] = {"n_slices": len(truth), "n_nodule_slices": int(np.sum(has_nodule)), "mae": {}}
    for k, target in enumerate(spec):
        valid = ~np.isnan(truth[:, k])
        if target.probability:
            y = truth[valid, k] > 0.5
            out[f"{target.name}_auc"] = roc_auc(y, values[valid, k])
            out[f"{target.name}_accuracy"] = float(np.mean((values[valid, k] > 0.5) == y)) if valid.any() else None
            nod = valid & has_nodule
            out[f"{target.name}_auc_nodule_slices"] = roc_auc(truth[nod, k] > 0.5, values[nod, k])
            free = valid & ~has_nodule  # slices without a nodule: P > 0.5 there is a false alarm
            out[f"{target.name}_false_positives_nodule_free"] = int(np.sum(values[free, k] > 0.5))
        elif valid.any():
            out["mae"][target.name] = float(np.mean(np.abs(values[valid, k] - truth[valid, k])))
    return out


def nodule_scores(task_spec, raw: np.ndarray, targets: np.ndarray, n_views: int) -> dict[str, Any]:
    """Per-nodule scores from the raw outputs [M·V, width] of M nodules' V views (ROI-major) and their
    targets [M, K] (normalised, NaN = no label). A nodule's outputs are its views' raw outputs averaged, as
    the predictions table's ``mean`` row (so its probability is the sigmoid of its mean logit).

    Keys: ``n_nodules``, ``n_views``; per binary target ``<t>_auc`` (ROC AUC over nodules),
    ``<t>_accuracy`` (at 0.5) and ``<t>_auc_views`` (ROC AUC over single views); ``mae`` {target: mean
    absolute error over nodules on the target's scale: LIDC 1–5, diameter in mm}."""
    raw = np.asarray(raw, np.float64)
    m = len(targets)
    truth = np.asarray(task_spec.denormalize(np.asarray(targets, np.float64)))
    nodules = output_metrics(task_spec, raw.reshape(m, n_views, -1).mean(1), truth)
    views = output_metrics(task_spec, raw, np.repeat(truth, n_views, axis=0))
    out: dict[str, Any] = {"n_nodules": m, "n_views": m * n_views}
    for target in task_spec:
        if target.probability:
            out[f"{target.name}_auc"] = nodules[f"{target.name}_auc"]
            out[f"{target.name}_accuracy"] = nodules[f"{target.name}_accuracy"]
            out[f"{target.name}_auc_views"] = views[f"{target.name}_auc"]
    if nodules["mae"]:
        out["mae"] = nodules["mae"]
    return out
