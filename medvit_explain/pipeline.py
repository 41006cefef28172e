"""From a volume to explanation maps: ``explain_volume`` and its result.

Slices stream through in batches: each batch is preprocessed, scored and explained for every
requested target by every method. Maps stay at the model's resolution (``[items, T, gh, gw]`` per
method: kilobytes to a few megabytes), next to the preprocessing that made the inputs; a map is put on
the source grid only when it is asked for (:meth:`ExplainResult.map_array`), one (method, target) at
a time, so memory holds the CT plus a few maps whatever the number of targets and methods. Writing the
files is the output layer's job (:mod:`medvit_explain.outputs`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import MedvitInputError
from .prediction import PredictionBuilder, PredictionTable, model_inputs, primary_target
from .transforms import RoiInputs, SliceInputs, centers_from_mask, reoriented_view
from .versions import package_versions
from .volume import Volume

DEFAULT_METHODS = ("cdam", "agcam")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExplainResult:
    """Model-space maps, predictions and provenance of one explained volume; maps on the source grid
    on demand.

    ``model_maps[method]`` is ``[items, T, h, w]`` float32 (items: the canonical slices in order, or the
    ROI views ROI-major; h × w: the token grid, or the model input for a pixel-space custom method),
    raw signed values, on the device the model ran on.
    """

    volume: Volume
    methods: list[str]
    targets: list[str]
    model_maps: dict[str, torch.Tensor]
    predictions: PredictionTable
    inputs: SliceInputs | RoiInputs
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    model_info: dict[str, Any] = field(default_factory=dict)

    def _model_map(self, method: str, target: str) -> torch.Tensor:
        if method not in self.model_maps:
            raise KeyError(f"no map for method {method!r}; expected one of {', '.join(self.methods)}")
        if target not in self.targets:
            raise KeyError(f"no map for target {target!r}; expected one of {', '.join(self.targets)}")
        return self.model_maps[method][:, self.targets.index(target)]

    def map_array(self, method: str, target: str) -> np.ndarray:
        """One map on the source grid: float32 ``[X, Y, Z]`` (raw signed values; a view of a C-ordered
        ``[Z, Y, X]`` buffer). Computed on each call (bilinear upsampling and the inverse crop and
        reorientation); hold on to it only as long as you need it."""
        return self.inputs.project(self._model_map(method, target))

    def map_volume(self, method: str, target: str) -> Volume:
        """One map as a :class:`Volume` on the source grid (see :meth:`map_array`)."""
        return self.volume.with_array(self.map_array(method, target))

    def map_planes(self, method: str, target: str, z0: int, z1: int) -> np.ndarray:
        """Source voxel planes ``z0:z1`` (third voxel axis) of one map on the source grid: ``[X, Y, z1 - z0]``
        float32, equal to ``map_array(method, target)[:, :, z0:z1]``; for an axial acquisition only those
        planes are computed (what a viewer showing one plane needs)."""
        return self.inputs.project_planes(self._model_map(method, target), int(z0), int(z1))

    def map_slices(self, method: str, target: str, slices: Sequence[int]) -> np.ndarray:
        """Canonical (LPS-reoriented) slices ``slices`` of one map: ``[X, Y, len(slices)]`` float32. In
        slice mode only those slices are interpolated."""
        return self.inputs.canonical_slices(self._model_map(method, target), list(slices))

    # ------------------------------------------------------------------ display helpers (report)
    def display_slice(self, k: int, method: str | None = None, target: str | None = None) -> np.ndarray:
        """Canonical slice ``k`` shown the radiological way ([rows, cols]): the CT in HU, or a map."""
        if method is None:
            return np.ascontiguousarray(reoriented_view(self.volume.array, self.inputs.ornt)[:, :, k].T)
        return np.ascontiguousarray(self.map_slices(method, target, [k])[:, :, 0].T)

    def display_aspect(self) -> float:
        """Pixel aspect (row spacing / column spacing) of displayed slices."""
        axis_of = np.argsort(self.inputs.ornt[:, 0])
        return float(self.volume.spacing[axis_of[1]] / self.volume.spacing[axis_of[0]])

    def input_checksum(self) -> str | None:
        """SHA-256 of the input file or folder (computed once, kept in the volume's metadata)."""
        path = self.volume.metadata.get("path")
        if "sha256" not in self.volume.metadata and path and Path(path).exists():
            from .io.checksum import file_sha256

            self.volume.metadata["sha256"] = file_sha256(path)
        return self.volume.metadata.get("sha256")

    def summary(self) -> dict[str, Any]:
        path = self.volume.metadata.get("path")
        self.input_checksum()
        return {
            "input": {
                "path": path,
                "sha256": self.volume.metadata.get("sha256"),
                "shape": list(self.volume.shape),
                "spacing": [float(s) for s in self.volume.spacing],
                "format": self.volume.metadata.get("format"),
            },
            "model": self.model_info,
            "methods": self.methods,
            "targets": self.targets,
            "device": self.device,
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
            "versions": package_versions(),
            "results": self.predictions.summary(),
        }


def explain_volume(
    model,
    volume: Volume,
    methods: Sequence[str] = DEFAULT_METHODS,
    targets: Sequence[str | int] | None = None,
    *,
    batch_size: int = 16,
    precision: str = "fp32",
    roi_centers: np.ndarray | None = None,
    roi_mask: Volume | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ExplainResult:
    """Explain every slice (or every ROI) of ``volume`` with each method, for each target.

    Args:
        model: a model from :func:`medvit_explain.load_model` (device and eval mode as placed).
        volume: the CT.
        methods: explanation method names (see :func:`medvit_explain.list_methods`), or callables
            ``fn(model, images [B, C, H, W], target_indices, **options) -> [B, T, h, w]`` named by their
            ``name`` attribute or ``__name__`` (your own explainer, written back the same way).
        targets: target names or indices (default: all the model's targets, in output order).
        batch_size: slices per pass.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast).
        roi_centers / roi_mask: nodule centres (LPS mm, [R, 3]) or an instance mask: explain ROIs.
        method_options: extra options per method name.
        progress: called with the number of inputs done after each batch.

    Returns:
        an :class:`ExplainResult`: model-space maps, and each map on the volume's grid on demand.
    """
    from .explainers import explain_many
    from .registry import explainer_class

    methods, custom = _method_table(methods)
    registered = [m for m in methods if m not in custom]
    classes = {m: explainer_class(m) for m in registered}  # MethodError (exit 2) for an unknown name
    if precision not in PRECISIONS:
        raise MedvitInputError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    target_idx = model.task_spec.resolve(targets)
    target_names = [model.targets[i] for i in target_idx]
    labels = None
    if roi_mask is not None:
        if not roi_mask.same_grid(volume, atol=1e-3):
            raise MedvitInputError("the ROI mask is not on the CT's voxel grid; resample it onto the CT first")
        roi_centers, labels = centers_from_mask(roi_mask)
        if len(roi_centers) == 0:
            raise MedvitInputError("the ROI mask holds no labelled voxel (expected labels 1..n)")
    inputs = model_inputs(model, volume, roi_centers, labels)
    builder = PredictionBuilder(model, inputs)
    device = next(model.parameters()).device
    options = {m: dict((method_options or {}).get(m, {})) for m in methods}
    if PRECISIONS[precision] is not None:
        for m in registered:
            options[m].setdefault("autocast_dtype", PRECISIONS[precision])
    for m, cls in classes.items():
        cls.check_options(options[m])  # bad options fail before the first slice
    kept: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    # the registered methods run together (explain_many shares forwards where a method declares it)
    groups = ([registered] if registered else []) + [[m] for m in custom]
    timings = {"preprocess": 0.0, "predict": 0.0, **{"explain_" + "+".join(g): 0.0 for g in groups}}

    def run(images: torch.Tensor) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        images = _plain(images).to(device)
        t0 = time.perf_counter()
        with torch.no_grad(), _autocast(device, PRECISIONS[precision]):
            raw = model(images).float().cpu().numpy()
        timings["predict"] += time.perf_counter() - t0
        out = {}
        for group in groups:
            t0 = time.perf_counter()
            if group[0] in custom:
                out[group[0]] = custom[group[0]](model, images, target_idx, **options[group[0]])
            else:
                out.update(
                    explain_many(model, images, group, targets=target_idx, options={g: options[g] for g in group})
                )
            timings["explain_" + "+".join(group)] += time.perf_counter() - t0
        return raw, out

    if isinstance(inputs, RoiInputs):
        t0 = time.perf_counter()
        images = inputs.images()
        timings["preprocess"] += time.perf_counter() - t0
        raws = []
        for i in range(0, len(images), batch_size):
            raw, batch_maps = run(images[i : i + batch_size])
            raws.append(raw)
            for m in methods:
                kept[m].append(batch_maps[m].detach().float())
            if progress:
                progress(len(raw))
        builder.add_rois(np.concatenate(raws))
    else:
        t_pre = time.perf_counter()
        for batch in _prefetched(inputs.batches(batch_size), device):
            timings["preprocess"] += time.perf_counter() - t_pre
            raw, batch_maps = run(batch.images)
            builder.add_slices(raw, batch.slices, batch.source_k)
            for m in methods:
                kept[m].append(batch_maps[m].detach().float())
            if progress:
                progress(len(batch.slices))
            t_pre = time.perf_counter()
    maps = {m: torch.cat(kept[m]) if kept[m] else torch.zeros(0, len(target_idx), 1, 1) for m in methods}
    info = {"name": model.config.get("name", type(model).__name__) if hasattr(model, "config") else "model"}
    info.update(getattr(model, "source_info", {}) or {})
    return ExplainResult(volume, list(methods), target_names, maps, builder.table, inputs, timings, str(device), info)


def _plain(images: torch.Tensor) -> torch.Tensor:
    """A plain tensor view of MONAI's MetaTensor: every op on a MetaTensor goes through its
    ``__torch_function__`` (and the model's outputs would become MetaTensors too), which costs time."""
    return images.as_subclass(torch.Tensor) if type(images) is not torch.Tensor else images


def _prefetched(batches, device: torch.device):
    """On a GPU, prepare the next batch (CPU preprocessing, pinned copy) while the current one runs;
    on the CPU the same work would only compete for the cores, so batches come one after the other."""
    if device.type != "cuda":
        yield from batches
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


def _method_table(methods) -> tuple[list[str], dict[str, Callable]]:
    names, custom = [], {}
    for m in methods:
        if callable(m):
            name = str(getattr(m, "name", m.__name__))
            custom[name] = m
            names.append(name)
        else:
            names.append(str(m))
    return names, custom


def _autocast(device: torch.device, dtype):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["ExplainResult", "explain_volume", "primary_target"]
