"""Per-slice (or per-ROI) prediction: a volume → a table of every target's value."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MedvitInputError
from .transforms import RoiInputs, SliceInputs, centers_from_mask
from .vocabulary import PRIMARY_TARGET, primary_target
from .volume import Volume


def model_inputs(
    model, volume: Volume, roi_centers: np.ndarray | None = None, roi_labels: Sequence[int] | None = None
) -> SliceInputs | RoiInputs:
    """The preprocessing the model expects for this volume: slices, or ROIs when centres are given."""
    pre = model.preprocessing
    if roi_centers is not None:
        roi = RoiInputs(volume, pre, np.asarray(roi_centers, dtype=np.float64).reshape(-1, 3))
        roi.labels = list(roi_labels) if roi_labels is not None else list(range(1, len(roi.centers_mm) + 1))
        return roi
    if pre.get("mode", "slice") == "roi":
        raise MedvitInputError("this model expects nodule ROIs: pass --roi-centers FILE or --roi-mask FILE")
    return SliceInputs(volume, pre)


def output_columns(task_spec) -> list[str]:
    cols = []
    for target in task_spec:
        cols += [f"{target.name}_prob", f"{target.name}_logit"] if target.kind == "binary" else [target.name]
    return cols


def output_row(task_spec, raw: np.ndarray) -> dict[str, float]:
    """Raw model outputs [K] → {column: value}: probability and logit for binary targets, LIDC-scale
    values for regression targets."""
    values = task_spec.to_values(raw[None])[0]
    row = {}
    for k, target in enumerate(task_spec):
        if target.kind == "binary":
            row[f"{target.name}_prob"] = float(values[k])
            row[f"{target.name}_logit"] = float(raw[k])
        else:
            row[target.name] = float(values[k])
    return row


@dataclass
class PredictionTable:
    """Rows of predictions (one per slice, or per ROI and view) and a volume-level summary."""

    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "slice"
    primary: str = PRIMARY_TARGET

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        text = buffer.getvalue()
        if path is not None:
            from .io.writer import atomic_path

            with atomic_path(path) as tmp:
                Path(tmp).write_text(text)
        return text

    def column(self, name: str) -> np.ndarray:
        return np.array([row[name] for row in self.rows], dtype=np.float64)

    def summary(self, top: int = 5) -> dict[str, Any]:
        key = f"{self.primary}_prob"
        out: dict[str, Any] = {"mode": self.mode, "n_rows": len(self.rows)}
        if not self.rows or key not in self.columns:
            return out
        if self.mode == "slice":
            prob = self.column(key)
            order = np.argsort(-prob, kind="stable")[:top]
            out.update(
                {
                    "max_malignancy_prob": float(prob[order[0]]),
                    "max_malignancy_slice": int(self.rows[order[0]]["slice"]),
                    "max_malignancy_source_index": int(self.rows[order[0]]["source_index"]),
                    "top_slices": [
                        {
                            "slice": int(self.rows[i]["slice"]),
                            "source_index": int(self.rows[i]["source_index"]),
                            "prob": float(prob[i]),
                        }
                        for i in order
                    ],
                }
            )
        else:
            nodules = [row for row in self.rows if row["view"] == "mean"]
            out["nodules"] = nodules
            if nodules:
                best = max(nodules, key=lambda r: r[key])
                out["max_malignancy_prob"] = float(best[key])
                out["max_malignancy_roi"] = int(best["roi"])
        return out


def _slice_meta(inputs: SliceInputs, slices: np.ndarray, source_k: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    nx, ny, _ = inputs.canonical.shape
    for s, k in zip(slices, source_k):
        centre = inputs.pixel_to_voxel(int(s), (inputs.image_size[0] - 1) / 2, (inputs.image_size[1] - 1) / 2)
        z_mm = float(inputs.volume.index_to_physical(centre)[2])
        rows.append({"slice": int(s), "source_index": int(k), "z_mm": round(z_mm, 4)})
    return rows


class PredictionBuilder:
    """Collects raw outputs batch by batch into a :class:`PredictionTable`."""

    def __init__(self, model, inputs: SliceInputs | RoiInputs):
        self.task_spec = model.task_spec
        self.inputs = inputs
        self.mode = "slice" if isinstance(inputs, SliceInputs) else "roi"
        meta = (
            ["slice", "source_index", "z_mm"]
            if self.mode == "slice"
            else ["roi", "label", "view", "center_x_mm", "center_y_mm", "center_z_mm"]
        )
        targets, kinds = list(self.task_spec.names), list(self.task_spec.kinds)
        self.table = PredictionTable(
            meta + output_columns(self.task_spec), mode=self.mode, primary=targets[primary_target(targets, kinds)]
        )
        self._roi_raw: list[np.ndarray] = []

    def add_slices(self, raw: np.ndarray, slices: np.ndarray, source_k: np.ndarray) -> None:
        for meta, out in zip(_slice_meta(self.inputs, slices, source_k), raw):
            self.table.rows.append({**meta, **output_row(self.task_spec, out)})

    def add_rois(self, raw: np.ndarray) -> None:
        """All ROI inputs at once: [R·V, K] raw outputs, ROI-major."""
        roi: RoiInputs = self.inputs  # type: ignore[assignment]
        V = len(roi.views)
        for r, centre in enumerate(roi.centers_mm):
            base = {
                "roi": r,
                "label": int(roi.labels[r]),
                "center_x_mm": float(centre[0]),
                "center_y_mm": float(centre[1]),
                "center_z_mm": float(centre[2]),
            }
            for v, view in enumerate(roi.views):
                self.table.rows.append({**base, "view": view, **output_row(self.task_spec, raw[r * V + v])})
            # "view outputs averaged": the mean of the raw outputs (logits) over views
            self.table.rows.append(
                {**base, "view": "mean", **output_row(self.task_spec, raw[r * V : (r + 1) * V].mean(axis=0))}
            )


@torch.no_grad()
def predict(
    model,
    volume: Volume,
    *,
    batch_size: int = 32,
    roi_centers: np.ndarray | None = None,
    roi_mask: Volume | None = None,
    progress: Callable[[int], None] | None = None,
) -> PredictionTable:
    """Score every slice (or every ROI view) of ``volume``.

    Returns:
        a :class:`PredictionTable`; binary targets as probability and logit, regression targets on
        their LIDC scale.
    """
    labels = None
    if roi_mask is not None:
        roi_centers, labels = centers_from_mask(roi_mask)
    inputs = model_inputs(model, volume, roi_centers, labels)
    builder = PredictionBuilder(model, inputs)
    device = next(model.parameters()).device
    if isinstance(inputs, RoiInputs):
        images = inputs.images()
        raw = (
            torch.cat(
                [model(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
            )
            if len(images)
            else torch.zeros(0, 1)
        )
        builder.add_rois(raw.numpy())
        if progress:
            progress(len(images))
        return builder.table
    for batch in inputs.batches(batch_size):
        raw = model(batch.images.to(device)).float().cpu().numpy()
        builder.add_slices(raw, batch.slices, batch.source_k)
        if progress:
            progress(len(batch.slices))
    return builder.table
