"""Per-slice (or per-ROI) prediction: a volume → a table of every target's value."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MedvitInputError
from .transforms import InputBatch, ModelInputs, Preprocessing, RoiInputs, SliceInputs, centers_from_mask
from .vocabulary import PRIMARY_TARGET, primary_target
from .volume import Volume
from .volumetric_inputs import CubeInputs, VolumeInputs


def model_inputs(
    model, volume: Volume, roi_centers: np.ndarray | None = None, roi_mask: Volume | None = None
) -> ModelInputs:
    """The model's inputs for this volume: its slices, or nodule ROIs around ``roi_centers`` (LPS mm,
    [R, 3]) or around each label of ``roi_mask`` (an instance mask on the CT's grid). Every command and
    the API go through here, so the checks are the same everywhere."""
    pre = Preprocessing.from_config(model.preprocessing)  # one typed config for both modes
    labels = None
    if roi_mask is not None:
        if not roi_mask.same_grid(volume, atol=1e-3):
            raise MedvitInputError("the ROI mask is not on the CT's voxel grid; resample it onto the CT first")
        roi_centers, labels = centers_from_mask(roi_mask)
        if len(roi_centers) == 0:
            raise MedvitInputError("the ROI mask holds no labelled voxel (expected labels 1..n)")
    volumetric = len(pre.image_size) == 3
    if roi_centers is not None:
        if pre.mode == "volume":
            raise MedvitInputError(
                "this model explains whole volumes (preprocessing mode volume), not nodule ROIs: "
                "drop --roi-centers / --roi-mask"
            )
        roi_centers = np.asarray(roi_centers, dtype=np.float64).reshape(-1, 3)
        check_centres_inside(roi_centers, volume)
        return (CubeInputs if volumetric else RoiInputs)(volume, pre, roi_centers, labels)
    if pre.mode == "roi":
        raise MedvitInputError("this model expects nodule ROIs: pass --roi-centers FILE or --roi-mask FILE")
    return VolumeInputs(volume, pre) if volumetric else SliceInputs(volume, pre)


def check_centres_inside(centres: np.ndarray, volume: Volume) -> None:
    """Refuse ROI centres (LPS mm) that lie outside the CT (beyond half a voxel past its first or last voxel
    centre): such a crop holds only padding, and its score would mean nothing."""
    index = volume.physical_to_index(centres)
    outside = np.any((index < -0.5) | (index > np.asarray(volume.shape) - 0.5), axis=1)
    if not np.any(outside):
        return
    first = int(np.argmax(outside))
    corners = volume.index_to_physical(np.array([[0.0, 0.0, 0.0], np.asarray(volume.shape, dtype=float) - 1]))
    lo, hi = np.minimum(*corners), np.maximum(*corners)
    span = ", ".join(f"{a:.1f}..{b:.1f}" for a, b in zip(lo, hi))
    raise MedvitInputError(
        f"{int(outside.sum())} of {len(centres)} ROI centre(s) lie outside the CT, e.g. ROI {first + 1} at "
        f"{np.round(centres[first], 1).tolist()} mm (the CT spans x, y, z = {span} mm, LPS); give centres in this "
        "scan's LPS millimetres"
    )


def model_batches(inputs: ModelInputs, batch_size: int, device: torch.device) -> Iterator[InputBatch]:
    """The one batch loop: ``inputs`` in batches of ``batch_size`` items, images as plain tensors on
    ``device``. On a GPU the next batch is prepared (CPU preprocessing, pinned copy) while the current
    one runs; on the CPU the same work would only compete for the cores, so batches come in turn."""
    batches = inputs.batches(batch_size)
    if device.type != "cuda":
        for batch in batches:
            batch.images = _plain(batch.images).to(device)
            yield batch
        return
    from concurrent.futures import ThreadPoolExecutor

    def prepare():
        batch = next(batches, None)
        if batch is not None:
            batch.images = _plain(batch.images).pin_memory().to(device, non_blocking=True)
        return batch

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare)
        while (batch := pending.result()) is not None:
            pending = pool.submit(prepare)
            yield batch


def _plain(images: torch.Tensor) -> torch.Tensor:
    """A plain tensor view of a tensor subclass (MONAI's MetaTensor runs every op through its
    ``__torch_function__``, and the model's outputs would become MetaTensors too)."""
    return images.as_subclass(torch.Tensor) if type(images) is not torch.Tensor else images


def output_columns(task_spec) -> list[str]:
    cols = []
    for target in task_spec:
        cols += [f"{target.name}_prob", f"{target.name}_logit"] if target.probability else [target.name]
    return cols


def output_row(task_spec, raw: np.ndarray) -> dict[str, float]:
    """Raw model outputs [K] → {column: value}: probability and logit for binary targets, LIDC-scale
    values for regression targets."""
    values = task_spec.to_values(raw[None])[0]
    row = {}
    for k, target in enumerate(task_spec):
        if target.probability:
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
    output_columns: list[str] = field(default_factory=list)  # the model outputs' columns (the rest: where from)

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
        elif self.mode == "volume":
            out["max_malignancy_prob"] = float(self.rows[0][key])
        else:
            nodules = [row for row in self.rows if row["view"] == "mean"]
            out["nodules"] = nodules
            if nodules:
                best = max(nodules, key=lambda r: r[key])
                out["max_malignancy_prob"] = float(best[key])
                out["max_malignancy_roi"] = int(best["roi"])
        return out


def join_tables(tables: list[PredictionTable], prefixes: list[str]) -> PredictionTable:
    """One table from several models' tables of the same inputs: the first table's item columns, then
    each model's output columns, each prefixed with that model's entry of ``prefixes`` (``""`` for none).
    The tables must list the same items in the same order (same slices, or same ROIs and views)."""
    first = tables[0]
    keys = {"slice": ("slice",), "volume": ("volume",)}.get(first.mode, ("roi", "view"))
    order = [tuple(r[k] for k in keys) for r in first.rows]
    for table in tables[1:]:
        if table.mode != first.mode or [tuple(r[k] for k in keys) for r in table.rows] != order:
            raise MedvitInputError(
                "the models' inputs do not line up (their ROI views differ); explain with one model at a time"
            )
    items = [c for c in first.columns if c not in first.output_columns]
    outputs = [prefix + c for table, prefix in zip(tables, prefixes, strict=True) for c in table.output_columns]
    rows = []
    for i, row in enumerate(first.rows):
        joined = {c: row[c] for c in items}
        for table, prefix in zip(tables, prefixes, strict=True):
            joined.update({prefix + c: table.rows[i][c] for c in table.output_columns})
        rows.append(joined)
    owner = next((i for i, t in enumerate(tables) if f"{t.primary}_prob" in t.columns), 0)
    primary = prefixes[owner] + tables[owner].primary
    return PredictionTable(items + outputs, rows, mode=first.mode, primary=primary, output_columns=outputs)


class PredictionBuilder:
    """Collects raw outputs batch by batch (``add``) into a :class:`PredictionTable` (``finish``): one row
    per item; in ROI mode each ROI's views are followed by a ``mean`` row (the logits averaged over
    views, as the published LIDC experiments did)."""

    def __init__(self, model, inputs: ModelInputs):
        self.task_spec = model.task_spec
        self.inputs = inputs
        names, kinds = list(self.task_spec.names), list(self.task_spec.score_kinds)
        outputs = output_columns(self.task_spec)
        self.table = PredictionTable(
            list(inputs.item_columns) + outputs,
            mode=inputs.mode,
            primary=names[primary_target(names, kinds)],
            output_columns=outputs,
        )
        self._raw: dict[int, np.ndarray] = {}

    def add(self, raw: np.ndarray, items: np.ndarray) -> None:
        """Raw outputs [B, K] of items ``items`` [B]."""
        for item, out in zip(np.asarray(items).tolist(), raw, strict=True):
            self._raw[int(item)] = np.asarray(out)

    def finish(self) -> PredictionTable:
        items = sorted(self._raw)
        for meta, item in zip(self.inputs.item_rows(items), items, strict=True):
            self.table.rows.append({**meta, **output_row(self.task_spec, self._raw[item])})
            if self.inputs.mode == "roi" and meta["view"] == self.inputs.views[-1]:
                views = self.table.rows[-len(self.inputs.views) :]
                raw = np.mean([self._raw[i] for i in range(item - len(views) + 1, item + 1)], axis=0)
                mean = {k: v for k, v in views[0].items() if k in ("roi", "label") or k.startswith("center")}
                self.table.rows.append({**mean, "view": "mean", **output_row(self.task_spec, raw)})
        return self.table


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
    inputs = model_inputs(model, volume, roi_centers, roi_mask)
    builder = PredictionBuilder(model, inputs)
    device = next(model.parameters()).device
    for batch in model_batches(inputs, batch_size, device):
        builder.add(model(batch.images).float().cpu().numpy(), batch.items)
        if progress:
            progress(len(batch.items))
    return builder.finish()
