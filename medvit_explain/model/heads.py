"""Task heads described in a checkpoint's config: pooled pre-logits ``[B, D]`` → one score per target.

The config's ``head`` says what sits between the backbone's pooled features and the outputs::

    head: linear                                    # default: one Linear (keys head.weight, head.bias)
    head: {layers: [{linear: 256}, relu, {dropout: 0.1}, linear]}      # an MLP (keys head.0.*, head.3.*)
    head: {parts: [{outputs: 1, layers: [linear]},                     # several heads side by side,
                   {outputs: 8, layers: [{linear: 64}, gelu, linear]}]}  # outputs concatenated (head.0.*, head.1.*)

A layer is ``linear`` (the last one: as many outputs as the task spec's head outputs, or the part's
``outputs``), ``{linear: N}`` (a hidden layer of N units), an activation (``relu``, ``gelu``,
``gelu_tanh``, ``silu``, ``tanh``, ``sigmoid``, ``identity``), ``{dropout: p}``, ``layernorm`` (or
``{layernorm: eps}``) or ``batchnorm``. The key names are ``torch.nn.Sequential``'s (``head.<index>.*``),
so a ``rename`` rule in the config's ``checkpoint`` maps a training script's head onto them.

Every head ends with the task spec's :meth:`~medvit_explain.model.task.TaskSpec.scores` (the identity
unless a target is a softmax), so ``head(pooled)`` is what the explainers differentiate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from medvit_explain.errors import CheckpointError

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}
_WHERE = "config head"
_EXAMPLE = "e.g. head: {layers: [{linear: 256}, relu, linear]}"

Scores = Callable[[torch.Tensor], torch.Tensor]


class _Scored:
    """A head's ``forward``: its raw outputs (``raw``, ``[B, output_width]``), then the task's scores."""

    scores: Scores | None

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        out = self.raw(pooled)
        return out if self.scores is None else self.scores(out)


class LinearHead(_Scored, nn.Linear):
    """One ``Linear`` followed by the task's scores (keys ``weight``, ``bias``)."""

    def __init__(self, width: int, outputs: int, scores: Scores | None = None) -> None:
        super().__init__(width, outputs)
        self.scores = scores

    def raw(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head's outputs before the task's scores, ``[B, output_width]``."""
        return nn.Linear.forward(self, pooled)


class SequentialHead(_Scored, nn.Sequential):
    """Layers in order (keys ``<index>.*``) followed by the task's scores."""

    def __init__(self, layers: Sequence[nn.Module], scores: Scores | None = None) -> None:
        super().__init__(*layers)
        self.scores = scores

    def raw(self, pooled: torch.Tensor) -> torch.Tensor:
        return nn.Sequential.forward(self, pooled)


class ConcatHead(_Scored, nn.ModuleList):
    """Several heads on the same pooled features, outputs concatenated in order (keys ``<part>.*``),
    followed by the task's scores."""

    def __init__(self, parts: Sequence[nn.Module], scores: Scores | None = None) -> None:
        super().__init__(parts)
        self.scores = scores

    def raw(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(pooled) for part in self], dim=-1)


def head_config(spec: Any) -> dict[str, Any]:
    """The config's ``head`` in its full form: ``{"layers": [...]}`` or ``{"parts": [...]}``; ``None`` /
    ``"linear"`` → ``{"layers": ["linear"]}``; a bare list → ``{"layers": list}``."""
    if spec is None or spec == "linear":
        return {"layers": ["linear"]}
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return {"layers": list(spec)}
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in ("layers", "parts"):
        raise CheckpointError(
            f"{_WHERE}: expected linear, {{layers: [...]}} or {{parts: [...]}} ({_EXAMPLE}), got {spec!r}"
        )
    return {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in spec.items()}


def build_head(spec: Any, width: int, outputs: int, scores: Scores | None = None) -> nn.Module:
    """The head a config describes: pooled features of ``width`` → ``outputs`` raw outputs → ``scores``.

    Raises :class:`CheckpointError` (one line saying what to write) for a description it cannot build."""
    spec = head_config(spec)
    if "layers" in spec:
        layers = _layers(spec["layers"], width, outputs, _WHERE)
        if len(layers) == 1 and isinstance(layers[0], nn.Linear):
            return LinearHead(width, outputs, scores)
        return SequentialHead(layers, scores)
    parts = spec["parts"]
    if not isinstance(parts, list) or not parts:
        raise CheckpointError(f"{_WHERE}.parts: expected a list of {{outputs: N, layers: [...]}}, got {parts!r}")
    built, total = [], 0
    for i, part in enumerate(parts):
        where = f"{_WHERE}.parts[{i}]"
        if not isinstance(part, Mapping) or set(part) - {"outputs", "layers"} or "outputs" not in part:
            raise CheckpointError(f"{where}: expected {{outputs: N, layers: [...]}}, got {part!r}")
        n = part["outputs"]
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise CheckpointError(f"{where}.outputs: expected a positive integer, got {n!r}")
        layers = _layers(part.get("layers") or ["linear"], width, n, where)
        built.append(layers[0] if len(layers) == 1 else nn.Sequential(*layers))
        total += n
    if total != outputs:
        raise CheckpointError(
            f"{_WHERE}.parts: the parts give {total} outputs in all, the task spec needs {outputs} "
            "(one per binary/regression target, one per class of a softmax target, in target order)"
        )
    return ConcatHead(built, scores)


def _layers(items: Any, width: int, outputs: int, where: str) -> list[nn.Module]:
    if not isinstance(items, list) or not items:
        raise CheckpointError(f"{where}.layers: expected a non-empty list ({_EXAMPLE}), got {items!r}")
    layers: list[nn.Module] = []
    features = width
    for i, item in enumerate(items):
        last = i == len(items) - 1
        name, arg = _layer_name(item, f"{where}.layers[{i}]")
        if name == "linear":
            size = outputs if arg is None else arg
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise CheckpointError(f"{where}.layers[{i}]: expected {{linear: N}} with N > 0, got {item!r}")
            layers.append(nn.Linear(features, size))
            features = size
        elif name in _ACTIVATIONS:
            layers.append(_ACTIVATIONS[name]())
        elif name == "dropout":
            p = 0.0 if arg is None else arg
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise CheckpointError(f"{where}.layers[{i}]: expected {{dropout: p}} with 0 <= p < 1, got {item!r}")
            layers.append(nn.Dropout(float(p)))
        elif name == "layernorm":
            layers.append(nn.LayerNorm(features, eps=1e-5 if arg is None else float(arg)))
        elif name == "batchnorm":
            layers.append(nn.BatchNorm1d(features))
        if last and (name != "linear" or features != outputs):
            raise CheckpointError(
                f"{where}.layers: expected the last layer to be linear with {outputs} outputs "
                f"(the task spec's head outputs), got {item!r}"
            )
    return layers


def _layer_name(item: Any, where: str) -> tuple[str, Any]:
    known = ["linear", "dropout", "layernorm", "batchnorm", *_ACTIVATIONS]
    if isinstance(item, str):
        name, arg = item.strip().lower(), None
    elif isinstance(item, Mapping) and len(item) == 1:
        name, arg = next(iter(item.items()))
        name = str(name).strip().lower()
    else:
        raise CheckpointError(f"{where}: expected a layer name or {{name: argument}}, got {item!r}")
    if name not in known:
        raise CheckpointError(f"{where}: unknown layer {name!r}; expected one of {', '.join(known)}")
    return name, arg
