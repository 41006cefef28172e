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

from .errors import MedvitInputError, TargetError
from .prediction import PredictionBuilder, PredictionTable, model_batches, model_inputs
from .transforms import ModelInputs, reoriented_view
from .versions import package_versions
from .vocabulary import primary_target
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
    inputs: ModelInputs
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    model_info: dict[str, Any] = field(default_factory=dict)

    def model_map(self, method: str, target: str) -> torch.Tensor:
        """One target's maps at the model's resolution: ``[items, h, w]`` (raw signed values)."""
        if method not in self.model_maps:
            raise KeyError(f"no map for method {method!r}; expected one of {', '.join(self.methods)}")
        if target not in self.targets:
            raise KeyError(f"no map for target {target!r}; expected one of {', '.join(self.targets)}")
        return self.model_maps[method][:, self.targets.index(target)]

    def map_array(self, method: str, target: str) -> np.ndarray:
        """One map on the source grid: float32 ``[X, Y, Z]`` (raw signed values; a view of a C-ordered
        ``[Z, Y, X]`` buffer). Computed on each call (bilinear upsampling and the inverse crop and
        reorientation); hold on to it only as long as you need it."""
        return self.inputs.project(self.model_map(method, target))

    def map_volume(self, method: str, target: str) -> Volume:
        """One map as a :class:`Volume` on the source grid (see :meth:`map_array`)."""
        return self.volume.with_array(self.map_array(method, target))

    def map_planes(self, method: str, target: str, z0: int, z1: int) -> np.ndarray:
        """Source voxel planes ``z0:z1`` (third voxel axis) of one map on the source grid: ``[X, Y, z1 - z0]``
        float32, equal to ``map_array(method, target)[:, :, z0:z1]``; for an axial acquisition only those
        planes are computed (what a viewer showing one plane needs)."""
        return self.inputs.project_planes(self.model_map(method, target), int(z0), int(z1))

    def map_slices(self, method: str, target: str, slices: Sequence[int]) -> np.ndarray:
        """Canonical (LPS-reoriented) slices ``slices`` of one map: ``[X, Y, len(slices)]`` float32. In
        slice mode only those slices are interpolated."""
        return self.inputs.canonical_slices(self.model_map(method, target), list(slices))

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
                **({"resampled": self.volume.metadata["resampled"]} if self.volume.metadata.get("resampled") else {}),
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
        model: a model from :func:`medvit_explain.load_model` (device and eval mode as placed), or a
            list of models (e.g. a malignancy model and a biomarker model): one result holding every
            model's targets (see :class:`CombinedResult`); models whose preprocessing is the same share
            the inputs (each batch is made once), the others get a pass of their own.
        volume: the CT.
        methods: explanation method names (see :func:`medvit_explain.list_methods`), or callables
            ``fn(model, images [B, C, H, W], target_indices, **options) -> [B, T, h, w]`` named by their
            ``name`` attribute or ``__name__`` (your own explainer, written back the same way).
        targets: target names or indices (default: all the model's targets, in output order). With
            several models: names (``<label>.<target>`` where two models share a target name); each
            model explains those it has.
        batch_size: slices per pass.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast).
        roi_centers / roi_mask: nodule centres (LPS mm, [R, 3]) or an instance mask: explain ROIs.
        method_options: extra options per method name.
        progress: called with the number of inputs done after each batch (of each pass).

    Returns:
        an :class:`ExplainResult`: model-space maps, and each map on the volume's grid on demand.
    """
    if precision not in PRECISIONS:
        raise MedvitInputError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    several = len(models) > 1
    labels = model_labels(models)
    picks = _targets_per_model(models, labels, targets)
    named = _qualified(models, labels)
    keep = [i for i, pick in enumerate(picks) if pick or not several]  # a model none of whose targets is asked: skipped
    models, labels, picks = [models[i] for i in keep], [labels[i] for i in keep], [picks[i] for i in keep]
    names = [[named[i][k] for k in picks[j]] for j, i in enumerate(keep)]
    runners = [MethodRunner(m, methods, pick, precision, method_options) for m, pick in zip(models, picks)]
    results: list[ExplainResult | None] = [None] * len(models)
    for group, inputs in input_groups(models, volume, roi_centers, roi_mask):
        builders = {i: PredictionBuilder(models[i], inputs) for i in group}
        kept: dict[int, dict[str, list[torch.Tensor]]] = {i: {m: [] for m in runners[i].methods} for i in group}
        t_pre = time.perf_counter()
        for batch in model_batches(inputs, batch_size, _device(models[group[0]])):
            for i in group:
                runners[i].timings["preprocess"] += (time.perf_counter() - t_pre) / len(group)
                raw, maps = runners[i](batch.images.to(_device(models[i])))
                builders[i].add(raw, batch.items)
                for m in runners[i].methods:
                    kept[i][m].append(maps[m].detach().float())
            if progress:
                progress(len(batch.items))
            t_pre = time.perf_counter()
        for i in group:
            results[i] = _result(models[i], volume, inputs, runners[i], kept[i], builders[i])
    if not several:
        return results[0]
    return CombinedResult([r for r in results if r is not None], labels, names)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _result(model, volume: Volume, inputs: ModelInputs, runner, kept, builder) -> ExplainResult:
    t = len(runner.target_idx)
    maps = {m: torch.cat(kept[m]) if kept[m] else torch.zeros(0, t, 1, 1) for m in runner.methods}
    target_names = [model.targets[i] for i in runner.target_idx]
    device = str(_device(model))
    return ExplainResult(
        volume, runner.methods, target_names, maps, builder.finish(), inputs, runner.timings, device, model_info(model)
    )


def model_info(model) -> dict[str, Any]:
    """What ``summary.json`` and the report say about a model: name, checkpoint and checksum, targets,
    and the preprocessing it ran with (every value, and which ones were defaults)."""
    config = getattr(model, "config", None) or {}
    info: dict[str, Any] = {"name": config.get("name", type(model).__name__)}
    info.update(getattr(model, "source_info", {}) or {})
    if getattr(model, "targets", None) is not None:
        info["targets"] = list(model.targets)
    if getattr(model, "preprocessing", None) is not None:
        info["preprocessing"] = model.preprocessing
        info["preprocessing_defaults"] = list(getattr(model, "preprocessing_defaults", []) or [])
    return info


def model_labels(models: Sequence) -> list[str]:
    """A short distinct label per model: its checkpoint's name (file stem or folder), else its config name."""
    labels = []
    for model in models:
        source = (getattr(model, "source_info", None) or {}).get("checkpoint")
        path = Path(source) if source else None
        label = "" if path is None else (path.parent.name if path.name == "model.safetensors" else path.stem)
        label = label or str((getattr(model, "config", None) or {}).get("name") or "model")
        labels.append(label if label not in labels else f"{label}-{len(labels) + 1}")
    return labels


def _targets_per_model(models: Sequence, labels: list[str], targets) -> list[list[int]]:
    """Each model's target indices: all by default; else the names that model has (a name shared by two
    models is written ``<label>.<target>``)."""
    if len(models) == 1:
        return [models[0].task_spec.resolve(targets)]
    if targets is None or (isinstance(targets, str) and targets.strip().lower() == "all"):
        return [list(range(len(m.targets))) for m in models]
    wanted = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    picks: list[list[int]] = [[] for _ in models]
    for name in wanted:
        owners = []
        for i, m in enumerate(models):
            local = name.removeprefix(f"{labels[i]}.")
            if local in m.targets:
                owners.append((i, list(m.targets).index(local)))
        if len(owners) != 1:
            names = ", ".join(n for per_model in _qualified(models, labels) for n in per_model)
            why = "no model has it" if not owners else "several models have it; write <model>.<target>"
            raise TargetError(f"target {name!r}: {why} (expected one of {names})")
        i, k = owners[0]
        if k not in picks[i]:
            picks[i].append(k)
    return picks


def check_targets(model, targets) -> None:
    """:class:`TargetError` now (before any work) if ``targets`` names a target no model has."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    _targets_per_model(models, model_labels(models), targets)


def _qualified(models: Sequence, labels: list[str]) -> list[list[str]]:
    """Each model's target names as a run of several models shows them: ``<target>``, or
    ``<label>.<target>`` where two models share the name."""
    counts: dict[str, int] = {}
    for m in models:
        for t in m.targets:
            counts[t] = counts.get(t, 0) + 1
    return [[t if counts[t] == 1 else f"{label}.{t}" for t in m.targets] for m, label in zip(models, labels)]


def input_groups(
    models: Sequence, volume: Volume, roi_centers=None, roi_mask=None
) -> list[tuple[list[int], ModelInputs]]:
    """Models that preprocess alike share one :class:`ModelInputs` (each batch is made once): ``[(model
    indices, inputs)]`` in first-model order."""
    from .transforms import Preprocessing

    groups: dict[Preprocessing, list[int]] = {}
    for i, m in enumerate(models):
        groups.setdefault(Preprocessing.from_config(m.preprocessing), []).append(i)
    return [(group, model_inputs(models[group[0]], volume, roi_centers, roi_mask)) for group in groups.values()]


def input_count(model, volume: Volume, roi_centers=None, roi_mask=None) -> int:
    """How many batches' worth of items :func:`explain_volume` runs: the inputs of every preprocessing pass
    (what a progress bar's total is)."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    return sum(inputs.n_items for _, inputs in input_groups(models, volume, roi_centers, roi_mask))


class CombinedResult(ExplainResult):
    """Several models' results on one study, read like one: ``targets`` are every model's targets
    (``<label>.<target>`` where two share a name), ``predictions`` one table (the models' columns side by
    side), and each map comes from the model that has the target, projected with that model's own
    inverse preprocessing. ``parts`` holds the single-model results; ``model_maps`` is empty (use
    :meth:`model_map`)."""

    def __init__(self, parts: list[ExplainResult], labels: list[str], names: list[list[str]]) -> None:
        from .prediction import join_tables

        self.parts, self.labels = parts, labels
        self._where: dict[str, tuple[ExplainResult, str]] = {}
        prefixes = []
        for part, label, part_names in zip(parts, labels, names, strict=True):
            prefixes.append(f"{label}." if any(n != t for n, t in zip(part_names, part.targets)) else "")
            self._where.update({n: (part, t) for n, t in zip(part_names, part.targets, strict=True)})
        timings: dict[str, float] = {}
        for part, label in zip(parts, labels, strict=True):
            timings.update({f"{label}: {k}": v for k, v in part.timings.items()})
        info = {
            "name": " + ".join(str(p.model_info.get("name", label)) for p, label in zip(parts, labels, strict=True)),
            "models": [{"label": label, **p.model_info} for p, label in zip(parts, labels, strict=True)],
        }
        super().__init__(
            volume=parts[0].volume,
            methods=list(parts[0].methods),
            targets=list(self._where),
            model_maps={},
            predictions=join_tables([p.predictions for p in parts], prefixes),
            inputs=parts[0].inputs,
            timings=timings,
            device=parts[0].device,
            model_info=info,
        )

    def _part(self, method: str, target: str) -> tuple[ExplainResult, str]:
        if method not in self.methods:
            raise KeyError(f"no map for method {method!r}; expected one of {', '.join(self.methods)}")
        if target not in self._where:
            raise KeyError(f"no map for target {target!r}; expected one of {', '.join(self.targets)}")
        return self._where[target]

    def model_map(self, method: str, target: str) -> torch.Tensor:
        part, local = self._part(method, target)
        return part.model_map(method, local)

    def map_array(self, method: str, target: str) -> np.ndarray:
        part, local = self._part(method, target)
        return part.map_array(method, local)

    def map_planes(self, method: str, target: str, z0: int, z1: int) -> np.ndarray:
        part, local = self._part(method, target)
        return part.map_planes(method, local, z0, z1)

    def map_slices(self, method: str, target: str, slices: Sequence[int]) -> np.ndarray:
        part, local = self._part(method, target)
        return part.map_slices(method, local, slices)


class MethodRunner:
    """One batch through the model (the scores) and every method (the maps), timed per stage.

    Registered methods run together through ``explain_many`` (which shares a forward pass where a method
    declares it); a callable ``fn(model, images, target_indices, **options)`` runs on its own."""

    def __init__(self, model, methods, target_idx: list[int], precision: str, method_options) -> None:
        from .registry import explainer_class

        self.model, self.target_idx, self.dtype = model, target_idx, PRECISIONS[precision]
        self.methods, self.custom = _method_table(methods)
        self.registered = [m for m in self.methods if m not in self.custom]
        self.options = {m: dict((method_options or {}).get(m, {})) for m in self.methods}
        for m in self.registered:
            if self.dtype is not None:
                self.options[m].setdefault("autocast_dtype", self.dtype)
            explainer_class(m).check_options(self.options[m])  # unknown names and bad options fail first
        self.groups = ([self.registered] if self.registered else []) + [[m] for m in self.custom]
        self.timings = {"preprocess": 0.0, "predict": 0.0, **{_timing_key(g): 0.0 for g in self.groups}}

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        from .explainers import explain_many

        t0 = time.perf_counter()
        with torch.no_grad(), _autocast(images.device, self.dtype):
            raw = self.model(images).float().cpu().numpy()
        self.timings["predict"] += time.perf_counter() - t0
        out: dict[str, torch.Tensor] = {}
        for group in self.groups:
            t0 = time.perf_counter()
            if group[0] in self.custom:
                out[group[0]] = self.custom[group[0]](self.model, images, self.target_idx, **self.options[group[0]])
            else:
                options = {m: self.options[m] for m in group}
                out.update(explain_many(self.model, images, group, targets=self.target_idx, options=options))
            self.timings[_timing_key(group)] += time.perf_counter() - t0
        return raw, out


def _timing_key(group: Sequence[str]) -> str:
    return "explain_" + "+".join(group)


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


__all__ = [
    "CombinedResult",
    "ExplainResult",
    "MethodRunner",
    "explain_volume",
    "input_count",
    "model_labels",
    "primary_target",
]
