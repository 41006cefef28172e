"""Dataset-level audit of malignancy predictions (``medvit-explain audit``).

Per study: every slice is scored and explained (``explain_volume``) for the malignancy target.

* Study label: malignant if any nodule in the study's JSON is malignant. Study score: the maximum
  slice probability of malignancy. Slice level: every labelled slice (as in training: nodules with a
  cross-section ≥ ``min_area_mm2``; slices that only graze one are left out).
* Discrimination: ROC and precision–recall curves with ROC AUC and average precision; sensitivity and
  specificity at the operating point ``threshold`` (0.5). Calibration: reliability diagram over 10 equal
  bins and the expected calibration error ECE = Σ_b (n_b / n) |mean p_b − frequency_b|.
* "Right for the wrong reason": on the study's ``top_slices`` slices with the highest probability, the
  share of each method's positive map mass inside the nodule(s), inside the lungs and outside the body
  (body = above −500 HU with each axial plane's holes filled). Studies are listed with the least
  evidence inside the lesion first; studies without a nodule follow, most evidence outside the body first.

A study that fails is reported and skipped; the audit goes on. The result is an :class:`AuditResult`;
:mod:`medvit_explain.report.evaluation` renders it (``audit.html``, ``audit.csv``, ``audit.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputNotFoundError, MedvitInputError
from .labels import load_study_volumes, lung_mask_path, pixel_area_mm2, read_nodules, slice_targets
from .scores import roc_auc
from .studies import Study, find_studies

__all__ = ["AuditResult", "StudyPicture", "audit", "calibration", "curves"]


@dataclass
class StudyPicture:
    """One slice of a study as the report draws it: the CT in HU [rows, cols], each method's map,
    the nodule and body masks (bool) and the pixel aspect."""

    ct: np.ndarray
    maps: dict[str, np.ndarray]
    nodule: np.ndarray | None
    body: np.ndarray | None
    aspect: float = 1.0
    title: str = ""


@dataclass
class AuditResult:
    """``rows``: one dict per study (the columns of ``audit.csv``), in report order; ``summary``: what
    ``audit.json`` holds beside them; ``pictures``: (study, picture) of the first rows."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    failures: list[dict[str, str]] = field(default_factory=list)
    pictures: list[tuple[str, StudyPicture]] = field(default_factory=list)


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Reliability bins (mean confidence, observed frequency, count) and the ECE over ``bins`` equal bins."""
    labels = np.asarray(labels, dtype=float)
    probs = np.asarray(probs, dtype=float)
    which = np.minimum((probs * bins).astype(int), bins - 1)
    conf, freq, count = np.zeros(bins), np.zeros(bins), np.zeros(bins, dtype=int)
    for b in range(bins):
        sel = which == b
        count[b] = int(sel.sum())
        if count[b]:
            conf[b], freq[b] = probs[sel].mean(), labels[sel].mean()
    ece = float(np.sum(count * np.abs(conf - freq)) / max(1, len(probs)))
    return {"confidence": conf.tolist(), "frequency": freq.tolist(), "count": count.tolist(), "ece": ece}


def curves(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """ROC (fpr, tpr, AUC), precision–recall (AP), sensitivity / specificity at ``threshold`` and the
    calibration of ``scores`` (probabilities) against binary ``labels``."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(scores, dtype=float)
    out: dict[str, Any] = {"n": int(len(y)), "n_positive": int(y.sum())}
    pos, neg = int(y.sum()), int((~y).sum())
    out["sensitivity"] = float((p[y] >= threshold).mean()) if pos else None
    out["specificity"] = float((p[~y] < threshold).mean()) if neg else None
    out["calibration"] = calibration(y, p)
    out["ece"] = out["calibration"]["ece"]
    if pos and neg:
        order = np.argsort(-p, kind="stable")
        ys, ps = y[order], p[order]
        distinct = np.r_[np.where(np.diff(ps))[0], len(ps) - 1]
        tps = np.cumsum(ys)[distinct]
        fps = (1 + distinct) - tps
        out["tpr"] = np.r_[0.0, tps / pos].tolist()
        out["fpr"] = np.r_[0.0, fps / neg].tolist()
        precision = tps / (tps + fps)
        recall = tps / pos
        out["precision"] = np.r_[1.0, precision].tolist()
        out["recall"] = np.r_[0.0, recall].tolist()
        out["auc"] = roc_auc(y, p)
        out["ap"] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    else:
        out.update({"tpr": None, "fpr": None, "precision": None, "recall": None, "auc": None, "ap": None})
    return out


def _share(pos: np.ndarray, region: np.ndarray | None, total: float) -> float | None:
    if region is None:
        return None
    return float((pos * region).sum() / total) if total > 0 else 0.0


@dataclass
class _Scored:
    """One audited study: its row, its labelled slices' (label, probability) and what its picture needs."""

    row: dict[str, Any]
    slice_y: list[bool]
    slice_p: list[float]
    result: Any  # the ExplainResult
    mask_canon: np.ndarray
    body_canon: np.ndarray
    p_max: float
    label: int


def _evidence(row: dict, result, methods: Sequence[str], top: np.ndarray, masks: dict, has_nodule: bool) -> None:
    """Each method's share of positive malignancy evidence on the ``top`` slices inside the nodule,
    the lungs and outside the body (None where the mask is missing; no nodule: None inside it)."""
    for m in methods:
        pos = np.clip(result.map_slices(m, "malignancy", top), 0, None)
        total = float(pos.sum())
        row[f"{m}_in_nodule"] = _share(pos, masks["nodule"], total) if has_nodule else None
        row[f"{m}_in_lungs"] = _share(pos, masks["lungs"], total)
        row[f"{m}_outside_body"] = _share(pos, ~masks["body"], total)


def _score_study(model, study: Study, methods: Sequence[str], settings: dict[str, Any]) -> _Scored:
    """Explain one study; its row (score, label, evidence shares) and its labelled slices."""
    from ..io import load_volume
    from ..metrics.masks import body_mask
    from ..pipeline import explain_volume
    from ..transforms import reoriented_view

    spec = model.task_spec
    volume, mask = load_study_volumes(study)
    nodules = read_nodules(study)
    lungs_path = lung_mask_path(study.path)
    lungs = load_volume(lungs_path).array > 0 if lungs_path is not None else None
    result = explain_volume(model, volume, list(methods), targets=["malignancy"], batch_size=settings["batch_size"])
    ornt = result.inputs.ornt
    ks = result.predictions.column("slice").astype(int)
    probs = result.predictions.column("malignancy_prob").astype(float)
    mask_canon = reoriented_view(mask.array, ornt)
    t, labelled, _ = slice_targets(spec, nodules, mask_canon, pixel_area_mm2(volume, ornt), settings["min_area_mm2"])
    truth = spec.denormalize(t)[:, spec.names.index("malignancy")]
    keep = [(truth[k] > 0.5, p) for k, p in zip(ks, probs, strict=True) if labelled[k] and np.isfinite(truth[k])]
    top = ks[np.argsort(-probs, kind="stable")[: settings["top_slices"]]]
    body_canon = reoriented_view(body_mask(volume.array, ornt), ornt)
    masks = {
        "nodule": mask_canon[:, :, top] > 0,
        "lungs": reoriented_view(lungs, ornt)[:, :, top] if lungs is not None else None,
        "body": body_canon[:, :, top],
    }
    label = int(any(int(n.get("malignancy", 0)) == 1 for n in nodules))
    row: dict[str, Any] = {
        "study": study.study_id,
        "label": label,
        "score": float(probs.max()),
        "predicted": int(probs.max() >= settings["threshold"]),
        "n_nodules": len(nodules),
        "top_slice": int(top[0]),
    }
    has_nodule = bool((mask_canon > 0).any())  # a lesion the top slices miss scores 0
    _evidence(row, result, methods, top, masks, has_nodule)
    return _Scored(
        row, [y for y, _ in keep], [p for _, p in keep], result, mask_canon, body_canon, float(probs.max()), label
    )


def _picture(scored: _Scored, methods: Sequence[str]) -> StudyPicture:
    """The study's top slice with each method's map, for the report."""
    result, k0 = scored.result, int(scored.row["top_slice"])
    return StudyPicture(
        ct=result.display_slice(k0),
        maps={m: result.display_slice(k0, m, "malignancy") for m in methods},
        nodule=scored.mask_canon[:, :, k0].T > 0,
        body=scored.body_canon[:, :, k0].T,
        aspect=result.display_aspect(),
        title=f"{scored.row['study']}: slice {k0}, P(malignancy) = {scored.p_max:.3f}, label {scored.label}",
    )


def _order_key(row: dict[str, Any], methods: Sequence[str]):
    shares = [row[f"{m}_in_nodule"] for m in methods if row[f"{m}_in_nodule"] is not None]
    if shares:
        return (0, float(np.mean(shares)))
    outside = [row[f"{m}_outside_body"] or 0.0 for m in methods]
    return (1, -float(np.mean(outside)) if outside else 0.0)


def _keep_first_pictures(pictures: dict, rows: list[dict], methods: Sequence[str], limit: int) -> None:
    """Drop the pictures of studies that can no longer be among the first ``limit`` rows of the report
    (so an audit of many studies holds at most ``limit`` pictures)."""
    ranked = sorted(range(len(rows)), key=lambda i: (_order_key(rows[i], methods), i))
    first = {rows[i]["study"] for i in ranked[:limit]}
    for name in [n for n in pictures if n not in first]:
        del pictures[name]


def _check(model, data, methods: Sequence[str]) -> list[Study]:
    from ..registry import explainer_class

    for m in methods:
        explainer_class(m)  # MethodError for an unknown name, before any study is read
    if not Path(data).exists():
        raise InputNotFoundError(f"audit data not found: {data}")
    studies = find_studies(data)
    if "malignancy" not in model.task_spec.names:
        raise MedvitInputError("the audit needs a model with a 'malignancy' target")
    return studies


def _summary(data, rows: list[dict], slice_y: list, slice_p: list, failures: list, settings: dict) -> dict[str, Any]:
    threshold = settings["threshold"]
    return {
        "data": str(data),
        "n_studies": len(rows),
        "methods": list(settings["methods"]),
        "threshold": threshold,
        "top_slices": settings["top_slices"],
        "min_area_mm2": settings["min_area_mm2"],
        "study_label": "malignant if any nodule in the study's JSON is malignant",
        "study_score": "max over slices of P(malignancy)",
        "study": curves([r["label"] for r in rows], [r["score"] for r in rows], threshold) if rows else None,
        "slice": curves(slice_y, slice_p, threshold) if slice_y else None,
        "failures": failures,
    }


def audit(
    model,
    data,
    *,
    methods: Sequence[str] = ("cdam", "agcam"),
    batch_size: int = 16,
    top_slices: int = 3,
    min_area_mm2: float = 40.0,
    threshold: float = 0.5,
    pictures: int = 6,
    progress: bool = True,
    on_failure=None,
) -> AuditResult:
    """Audit ``model`` on the studies of ``data`` (a phantom folder or a manifest CSV); see the module doc.

    ``on_failure(study_name, message)`` is called for each study that fails (it is then skipped).
    """
    from tqdm.auto import tqdm

    studies = _check(model, data, methods)
    settings = dict(
        methods=methods, batch_size=batch_size, top_slices=top_slices, min_area_mm2=min_area_mm2, threshold=threshold
    )
    rows, failures, figs = [], [], {}
    slice_y, slice_p = [], []
    for study in tqdm(studies, desc="audit", unit="study", disable=not progress):
        try:
            scored = _score_study(model, study, methods, settings)
            slice_y += scored.slice_y
            slice_p += scored.slice_p
            rows.append(scored.row)
            figs[study.study_id] = _picture(scored, methods)
            _keep_first_pictures(figs, rows, methods, pictures)
        except Exception as exc:  # a failing study is reported and skipped, never aborting the audit
            message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            failures.append({"study": study.study_id, "error": message})
            if on_failure is not None:
                on_failure(study.study_id, message)
    rows.sort(key=lambda r: _order_key(r, methods))
    for r in rows:
        shares = [r[f"{m}_in_nodule"] for m in methods if r[f"{m}_in_nodule"] is not None]
        r["mostly_outside_lesion"] = bool(shares) and float(np.mean(shares)) < 0.5
    pics = [(r["study"], figs[r["study"]]) for r in rows[:pictures] if r["study"] in figs]
    return AuditResult(rows, _summary(data, rows, slice_y, slice_p, failures, settings), failures, pics)
