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

A study that fails is reported and skipped; the audit goes on.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputNotFoundError, MedvitInputError
from .vocabulary import to_json

__all__ = ["AuditResult", "audit", "calibration", "curves", "write_audit"]


@dataclass
class AuditResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    failures: list[dict[str, str]] = field(default_factory=list)
    pictures: list[tuple[str, bytes]] = field(default_factory=list)


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
    from .train import roc_auc

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

    from .io import load_volume
    from .metrics.masks import body_mask
    from .pipeline import explain_volume
    from .registry import explainer_class
    from .report.evaluation import study_figure
    from .train import find_studies, slice_targets
    from .transforms import reoriented_view

    for m in methods:
        explainer_class(m)  # MethodError for an unknown name, before any study is read
    if not Path(data).exists():
        raise InputNotFoundError(f"audit data not found: {data}")
    studies = find_studies(data)
    spec = model.task_spec
    if "malignancy" not in spec.names:
        raise MedvitInputError("the audit needs a model with a 'malignancy' target")
    mal = spec.names.index("malignancy")
    rows, failures, figs = [], [], {}
    slice_y, slice_p = [], []
    for study in tqdm(studies, desc="audit", unit="study", disable=not progress):
        try:
            volume = load_volume(study.image)
            mask = load_volume(study.nodule_mask)
            if not mask.same_grid(volume, atol=1e-3):
                raise MedvitInputError(f"{study.nodule_mask} is not on the grid of {study.image}")
            nodules = json.loads(Path(study.labels).read_text())["nodules"]
            from .evaluate import lung_mask_path

            lungs_path = lung_mask_path(study.image)
            lungs = load_volume(lungs_path).array > 0 if lungs_path is not None else None
            result = explain_volume(model, volume, list(methods), targets=["malignancy"], batch_size=batch_size)
            ornt = result.inputs.ornt
            table = result.predictions
            ks = table.column("slice").astype(int)
            probs = table.column("malignancy_prob").astype(float)
            axis_of = np.argsort(ornt[:, 0])
            pixel_area = float(volume.spacing[axis_of[0]] * volume.spacing[axis_of[1]])
            mask_canon = reoriented_view(mask.array, ornt)
            t, labelled, _ = slice_targets(spec, nodules, mask_canon, pixel_area, min_area_mm2)
            truth = spec.denormalize(t)[:, mal]
            for k, p in zip(ks, probs, strict=True):
                if labelled[k] and np.isfinite(truth[k]):
                    slice_y.append(truth[k] > 0.5)
                    slice_p.append(p)
            top = ks[np.argsort(-probs, kind="stable")[:top_slices]]
            body_canon = reoriented_view(body_mask(volume.array, ornt), ornt)[:, :, top]
            nod_canon = mask_canon[:, :, top] > 0
            lung_canon = reoriented_view(lungs, ornt)[:, :, top] if lungs is not None else None
            label = int(any(int(n.get("malignancy", 0)) == 1 for n in nodules))
            row: dict[str, Any] = {
                "study": study.name,
                "label": label,
                "score": float(probs.max()),
                "predicted": int(probs.max() >= threshold),
                "n_nodules": len(nodules),
                "top_slice": int(top[0]),
            }
            has_nodule = bool((mask_canon > 0).any())  # a lesion the top slices miss scores 0
            for m in methods:
                pos = np.clip(result.map_slices(m, "malignancy", top), 0, None)
                total = float(pos.sum())
                row[f"{m}_in_nodule"] = _share(pos, nod_canon, total) if has_nodule else None
                row[f"{m}_in_lungs"] = _share(pos, lung_canon, total)
                row[f"{m}_outside_body"] = _share(pos, ~body_canon, total)
            rows.append(row)
            k0 = int(top[0])
            shown = {m: result.display_slice(k0, m, "malignancy") for m in methods}
            png = study_figure(
                result.display_slice(k0),
                shown,
                mask_canon[:, :, k0].T > 0,
                reoriented_view(body_mask(volume.array, ornt), ornt)[:, :, k0].T,
                aspect=result.display_aspect(),
                title=f"{study.name}: slice {k0}, P(malignancy) = {probs.max():.3f}, label {label}",
            )
            figs[study.name] = png
        except Exception as exc:  # a failing study is reported and skipped, never aborting the audit
            message = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            failures.append({"study": study.name, "error": message})
            if on_failure is not None:
                on_failure(study.name, message)
    rows.sort(key=lambda r: _order_key(r, methods))
    for r in rows:
        shares = [r[f"{m}_in_nodule"] for m in methods if r[f"{m}_in_nodule"] is not None]
        r["mostly_outside_lesion"] = bool(shares) and float(np.mean(shares)) < 0.5
    summary = {
        "data": str(data),
        "n_studies": len(rows),
        "methods": list(methods),
        "threshold": threshold,
        "top_slices": top_slices,
        "min_area_mm2": min_area_mm2,
        "study_label": "malignant if any nodule in the study's JSON is malignant",
        "study_score": "max over slices of P(malignancy)",
        "study": curves([r["label"] for r in rows], [r["score"] for r in rows], threshold) if rows else None,
        "slice": curves(slice_y, slice_p, threshold) if slice_y else None,
        "failures": failures,
    }
    pics = [(r["study"], figs[r["study"]]) for r in rows[:pictures] if r["study"] in figs]
    return AuditResult(rows, summary, failures, pics)


def _order_key(row: dict[str, Any], methods: Sequence[str]):
    shares = [row[f"{m}_in_nodule"] for m in methods if row[f"{m}_in_nodule"] is not None]
    if shares:
        return (0, float(np.mean(shares)))
    outside = [row[f"{m}_outside_body"] or 0.0 for m in methods]
    return (1, -float(np.mean(outside)) if outside else 0.0)


def write_audit(result: AuditResult, out_dir: str | Path) -> dict[str, Path]:
    """``audit.html``, ``audit.csv`` and ``audit.json`` in ``out_dir`` (each written atomically)."""
    from .io.writer import atomic_path
    from .report.evaluation import render_audit

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MedvitInputError(f"--out {out} exists and is not a folder")
    html_text = render_audit(result)
    written = {"report": out / "audit.html", "csv": out / "audit.csv", "json": out / "audit.json"}
    with atomic_path(written["report"]) as tmp:
        tmp.write_text(html_text, encoding="utf-8")
    with atomic_path(written["csv"]) as tmp:
        with open(tmp, "w", newline="") as stream:
            header = list(result.rows[0]) if result.rows else ["study"]
            writer = csv.DictWriter(stream, fieldnames=header)
            writer.writeheader()
            for r in result.rows:
                writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    with atomic_path(written["json"]) as tmp:
        tmp.write_text(to_json({"summary": result.summary, "studies": result.rows}))
    return written
