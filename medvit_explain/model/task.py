"""Task spec: which targets a model predicts, in which output column, on which scale.

A target is ``binary`` (one logit; probability = sigmoid(logit)), ``regression`` (one output in
normalised units; value on the LIDC scale = output · std + mean) or ``multiclass`` (alias ``softmax``:
one head output per class, ``classes: [benign, malignant]``, and the class reported, ``positive: malignant``).

A multiclass target is scored, reported and explained by the **log-odds of its positive class**,
``log p_pos − log(1 − p_pos) = z_pos − logsumexp(z_other classes)`` with ``p = softmax(z)``: for two
classes exactly ``z_pos − z_neg``, the logit a binary head would have. So probability = sigmoid(score)
holds for it as for a binary target, and every rule written for binary targets (threshold 0, AUC,
calibration, faithfulness on the probability, the ``_prob`` / ``_logit`` columns) applies unchanged. CDAM
and AG-CAM explain that score (not the raw class logit ``z_pos``: under a softmax, adding the same
number to every class logit changes nothing, so evidence for ``z_pos`` alone includes evidence shared by
every class; nor ``log p_pos``, which saturates to a zero gradient as ``p_pos`` → 1).

The model's head has :attr:`TaskSpec.output_width` raw outputs (one per binary or regression target,
one per class of a multiclass target, in target order); :meth:`TaskSpec.scores` turns them into one
score per target, ``[B, K]`` — what the model's ``forward`` returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medvit_explain.errors import CheckpointError, TargetError
from medvit_explain.vocabulary import resolve_targets

KINDS = ("binary", "regression", "multiclass")
KIND_ALIASES = {"softmax": "multiclass", "classification": "binary", "logit": "binary"}
DEFAULT_TASK_SPEC = "lidc"
_PACKAGED_SPECS = {"lidc": "task_lidc.yaml"}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"task spec: expected a finite number for {what}, got {value!r}")
    return float(value)


def _classes(name: str, kind: str, data: Mapping[str, Any]) -> tuple[tuple[str, ...], int]:
    """(classes, index of the positive class) of a multiclass target; ((), 0) for the other kinds."""
    classes, positive = data.get("classes"), data.get("positive")
    if kind != "multiclass":
        if classes is not None or positive is not None:
            raise CheckpointError(
                f"task spec: target {name!r} is {kind}; classes/positive belong to a softmax target "
                "(kind: softmax, classes: [benign, malignant], positive: malignant)"
            )
        return (), 0
    if (
        not isinstance(classes, Sequence)
        or isinstance(classes, str)
        or len(classes) < 2
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise CheckpointError(
            f"task spec: softmax target {name!r}: expected classes, a list of two or more distinct names in the "
            f"order of the head's outputs (e.g. [benign, malignant]), got {classes!r}"
        )
    if positive is None:
        raise CheckpointError(
            f"task spec: softmax target {name!r}: say which class is reported and explained, "
            f"e.g. positive: {classes[-1]} (one of {list(classes)})"
        )
    if isinstance(positive, int) and not isinstance(positive, bool) and 0 <= positive < len(classes):
        return tuple(classes), positive
    if positive not in classes:
        raise CheckpointError(
            f"task spec: softmax target {name!r}: positive {positive!r} is not one of its classes {list(classes)}"
        )
    return tuple(classes), list(classes).index(positive)


@dataclass(frozen=True)
class Target:
    """One model output.

    ``scale`` is ``(lo, hi)`` on the original (LIDC) scale, for regression targets. ``mean``/``std``
    map that scale to the network's output: ``normalised = (value - mean) / std``. Binary targets have
    ``mean = 0, std = 1`` (the output is a logit) and may leave ``scale`` unset.
    """

    name: str
    kind: str
    scale: tuple[float, float] | None = None
    mean: float = 0.0
    std: float = 1.0
    description: str = ""
    classes: tuple[str, ...] = ()  # multiclass: the class of each raw output, in head order
    positive: int = 0  # multiclass: index into ``classes`` of the class reported and explained

    @property
    def probability(self) -> bool:
        """Scored as a logit whose sigmoid is a probability (binary and multiclass targets)."""
        return self.kind != "regression"

    @property
    def width(self) -> int:
        """Raw head outputs this target takes (one per class for multiclass, else one)."""
        return len(self.classes) if self.kind == "multiclass" else 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Target:
        if not isinstance(data, Mapping):
            raise CheckpointError(f"task spec: expected a mapping per target, got {data!r}")
        name = data.get("name")
        if not isinstance(name, str) or not name.strip() or "," in name:
            raise CheckpointError(f"task spec: expected a non-empty target name without commas, got {name!r}")
        kind = KIND_ALIASES.get(data.get("kind"), data.get("kind"))
        if kind not in KINDS:
            raise CheckpointError(
                f"task spec: target {name!r} has kind {data.get('kind')!r}; expected binary (one logit), "
                "regression (one value; give scale or mean/std) or softmax/multiclass (give classes and positive)"
            )
        known = {"name", "kind", "scale", "mean", "std", "normalization", "description", "classes", "positive"}
        extra = sorted(set(data) - known)
        if extra:
            raise CheckpointError(f"task spec: target {name!r} has unknown keys {extra}; expected {sorted(known)}")
        scale = data.get("scale")
        if scale is not None:
            if not isinstance(scale, Sequence) or isinstance(scale, str) or len(scale) != 2:
                raise CheckpointError(f"task spec: target {name!r}: expected scale [lo, hi], got {scale!r}")
            lo, hi = (_number(v, f"{name}.scale") for v in scale)
            if not lo < hi:
                raise CheckpointError(f"task spec: target {name!r}: expected scale lo < hi, got {scale!r}")
            scale = (lo, hi)
        norm = data.get("normalization", {}) or {}
        if not isinstance(norm, Mapping):
            raise CheckpointError(f"task spec: target {name!r}: expected normalization {{mean, std}}, got {norm!r}")
        mean, std = data.get("mean", norm.get("mean")), data.get("std", norm.get("std"))
        if kind == "regression":
            if scale is None and (mean is None or std is None):
                raise CheckpointError(f"task spec: regression target {name!r} needs a scale or mean and std")
            mean = _number(mean, f"{name}.mean") if mean is not None else (scale[0] + scale[1]) / 2
            std = _number(std, f"{name}.std") if std is not None else (scale[1] - scale[0]) / 2
            if std <= 0:
                raise CheckpointError(f"task spec: target {name!r}: expected std > 0, got {std}")
        else:
            if (mean not in (None, 0, 0.0)) or (std not in (None, 1, 1.0)):
                raise CheckpointError(f"task spec: {kind} target {name!r} is scored by a logit; remove mean/std")
            mean, std = 0.0, 1.0
        description = data.get("description", "") or ""
        if not isinstance(description, str):
            raise CheckpointError(f"task spec: target {name!r}: expected a string description")
        classes, positive = _classes(name, kind, data)
        return cls(
            name=name.strip(),
            kind=kind,
            scale=scale,
            mean=mean,
            std=std,
            description=description.strip(),
            classes=classes,
            positive=positive,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "multiclass":
            out["classes"] = list(self.classes)
            out["positive"] = self.classes[self.positive]
        if self.scale is not None:
            out["scale"] = [self.scale[0], self.scale[1]]
        if self.kind == "regression":
            out["mean"] = self.mean
            out["std"] = self.std
        out["description"] = self.description
        return out


@dataclass(frozen=True)
class TaskSpec:
    """Ordered targets; target ``i`` is output column ``i`` of the model (``[B, K]``, K = len(spec))."""

    targets: tuple[Target, ...]
    name: str = ""
    description: str = ""
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.targets:
            raise CheckpointError("task spec: expected at least one target, got none")
        seen: dict[str, int] = {}
        for i, target in enumerate(self.targets):
            if target.name in seen:
                raise CheckpointError(f"task spec: target name {target.name!r} appears twice")
            seen[target.name] = i
        self._index.update(seen)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> TaskSpec:
        """From ``{"name": ..., "targets": [{name, kind, scale, mean, std, description}, ...]}``
        (or just the list of targets)."""
        if isinstance(data, Sequence) and not isinstance(data, str):
            data = {"targets": list(data)}
        if not isinstance(data, Mapping):
            raise CheckpointError(f"task spec: expected a mapping with 'targets', got {type(data).__name__}")
        targets = data.get("targets")
        if not isinstance(targets, Sequence) or isinstance(targets, str):
            raise CheckpointError(f"task spec: expected 'targets' to be a list, got {targets!r}")
        return cls(
            targets=tuple(Target.from_dict(t) for t in targets),
            name=str(data.get("name", "") or ""),
            description=str(data.get("description", "") or ""),
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> TaskSpec:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise CheckpointError(f"cannot read task spec {str(path)!r}: {str(exc).splitlines()[0]}") from exc
        return cls.from_dict(data)

    @classmethod
    def default(cls) -> TaskSpec:
        """The shipped LIDC spec: malignancy (binary) + eight biomarkers (regression)."""
        return load_task_spec(DEFAULT_TASK_SPEC)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "targets": [t.to_dict() for t in self.targets],
        }

    # -- lookup -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self):
        return iter(self.targets)

    def __getitem__(self, key: str | int) -> Target:
        return self.targets[self.index(key)]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def kinds(self) -> list[str]:
        return [t.kind for t in self.targets]

    @property
    def binary_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.targets) if t.probability]

    @property
    def regression_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.targets) if t.kind == "regression"]

    @property
    def score_kinds(self) -> list[str]:
        """How each target's score reads: ``binary`` (a logit: binary and multiclass) or ``regression``."""
        return ["binary" if t.probability else "regression" for t in self.targets]

    @property
    def output_width(self) -> int:
        """Raw head outputs: one per binary / regression target, one per class of a multiclass target."""
        return sum(t.width for t in self.targets)

    def scores(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw head outputs ``[..., output_width]`` → one score per target ``[..., K]``: the output itself,
        or for a multiclass target the log-odds of its positive class,
        ``z_pos − logsumexp(z_others)`` (= ``log p_pos − log(1 − p_pos)``). Differentiable."""
        if raw.shape[-1] != self.output_width:
            raise ValueError(f"expected raw outputs [..., {self.output_width}], got {tuple(raw.shape)}")
        if all(t.kind != "multiclass" for t in self.targets):
            return raw
        cols, start = [], 0
        for t in self.targets:
            block = raw[..., start : start + t.width]
            if t.kind == "multiclass":
                others = torch.cat([block[..., : t.positive], block[..., t.positive + 1 :]], -1)
                cols.append(block[..., t.positive] - torch.logsumexp(others, -1))
            else:
                cols.append(block[..., 0])
            start += t.width
        return torch.stack(cols, -1)

    def index(self, target: str | int) -> int:
        """Output column of ``target`` (a name, or an index 0..K-1; a string of digits counts as an index
        when no target has that name)."""
        if isinstance(target, str) and ("," in target or target.strip().lower() == "all"):
            raise TargetError(f"expected one target, got {target!r}")
        return resolve_targets(self.names, [target])[0]

    def resolve(self, targets: str | int | Iterable[str | int] | None = None) -> list[int]:
        """Output columns for ``targets`` (:func:`medvit_explain.vocabulary.resolve_targets`): None or
        ``"all"`` → every target; names, indices or a comma list → their indices in the order given,
        duplicates dropped."""
        return resolve_targets(self.names, targets)

    # -- value conversion ---------------------------------------------------------------------------
    def _stats(self, like: Any, columns: list[int]) -> tuple[Any, Any, Any]:
        mean = [self.targets[i].mean for i in columns]
        std = [self.targets[i].std for i in columns]
        binary = [self.targets[i].probability for i in columns]
        if isinstance(like, torch.Tensor):
            dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
            return (
                torch.tensor(mean, dtype=dtype, device=like.device),
                torch.tensor(std, dtype=dtype, device=like.device),
                torch.tensor(binary, dtype=torch.bool, device=like.device),
            )
        return np.asarray(mean), np.asarray(std), np.asarray(binary)

    def _columns(self, values: Any, targets: Any) -> list[int]:
        columns = self.resolve(targets)
        if values.shape[-1:] != (len(columns),):
            raise ValueError(
                f"expected values of shape [..., {len(columns)}] (one column per target "
                f"{[self.names[i] for i in columns]}), got {tuple(values.shape)}"
            )
        return columns

    @staticmethod
    def _as_array(values: Any) -> Any:
        if isinstance(values, torch.Tensor):
            return values if values.is_floating_point() else values.to(torch.get_default_dtype())
        return np.asarray(values, dtype=np.result_type(np.asarray(values).dtype, np.float32))

    def normalize(self, values: Any, targets: Any = None) -> Any:
        """LIDC-scale values ``[..., K]`` → network units; binary columns (labels 0/1) pass through.

        Works on torch tensors (same device/dtype) and numpy arrays. ``targets`` selects which columns
        ``values`` holds (default: all, in spec order)."""
        values = self._as_array(values)
        mean, std, binary = self._stats(values, self._columns(values, targets))
        normed = (values - mean) / std
        return (
            torch.where(binary, values, normed)
            if isinstance(values, torch.Tensor)
            else np.where(binary, values, normed)
        )

    def denormalize(self, outputs: Any, targets: Any = None) -> Any:
        """Network outputs ``[..., K]`` → LIDC-scale values for regression columns; binary columns
        (logits) pass through unchanged. Inverse of :meth:`normalize`."""
        outputs = self._as_array(outputs)
        mean, std, binary = self._stats(outputs, self._columns(outputs, targets))
        values = outputs * std + mean
        return (
            torch.where(binary, outputs, values)
            if isinstance(outputs, torch.Tensor)
            else np.where(binary, outputs, values)
        )

    def to_values(self, outputs: Any, targets: Any = None) -> Any:
        """Scores ``[..., K]`` → what a user reads: probability = sigmoid(logit) for binary columns (for a
        multiclass target: its positive class's softmax probability), LIDC-scale value for regression
        columns. Differentiable for torch inputs."""
        outputs = self._as_array(outputs)
        columns = self._columns(outputs, targets)
        mean, std, binary = self._stats(outputs, columns)
        if isinstance(outputs, torch.Tensor):
            return torch.where(binary, torch.sigmoid(outputs), outputs * std + mean)
        with np.errstate(over="ignore"):
            prob = 1.0 / (1.0 + np.exp(-outputs))
        return np.where(binary, prob, outputs * std + mean)


def load_task_spec(
    spec: str | Path | Mapping[str, Any] | TaskSpec | None = None, base_dir: str | Path | None = None
) -> TaskSpec:
    """A :class:`TaskSpec` from a packaged name (``"lidc"``), a YAML path (relative to ``base_dir``),
    a dict, or a spec (returned as is). ``None`` → the default LIDC spec."""
    if isinstance(spec, TaskSpec):
        return spec
    if spec is None:
        spec = DEFAULT_TASK_SPEC
    if isinstance(spec, Mapping) or (isinstance(spec, Sequence) and not isinstance(spec, str)):
        return TaskSpec.from_dict(spec)
    if isinstance(spec, str) and spec in _PACKAGED_SPECS:
        text = resources.files("medvit_explain.model").joinpath(_PACKAGED_SPECS[spec]).read_text(encoding="utf-8")
        return TaskSpec.from_dict(yaml.safe_load(text))
    path = Path(spec)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise CheckpointError(
            f"task spec {str(spec)!r} not found; expected a YAML file or one of {', '.join(_PACKAGED_SPECS)}"
        )
    return TaskSpec.from_yaml(path)
