"""The napari dock widget: pick a CT layer, a model, methods, targets and a device, then explain.

The explainer (model loading included, so torch is imported only then) runs in a worker thread
(``napari.qt.threading.create_worker``); the UI stays responsive and a progress bar advances after
each batch of slices. Each method × target map is added as an image layer on the CT's world grid
(diverging colormap centred at 0, ``translucent`` or ``additive`` blending), the per-slice scores go
into a table, and the view jumps to the slice with the highest malignancy probability.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
    Table,
)
from qtpy.QtCore import QObject, Signal

from ..registry import method_names
from ..viewer_logic import top_slice
from ..vocabulary import DEVICE_CHOICES
from ._layers import OVERLAY_BLENDINGS, lazy_overlay_layer_data, volume_from_layer

SCORE_COLUMNS_FIRST = ("slice", "source_index", "z_mm", "malignancy_prob")
DEFAULT_TARGETS = ("malignancy",)


def default_target_names() -> list[str]:
    """Target names of the packaged LIDC task spec (read from its YAML; no torch import)."""
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "model" / "task_lidc.yaml").read_text())
    return [t["name"] for t in spec["targets"]]


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (a queued Qt connection)."""

    advanced = Signal(int)


class ExplainWidget(Container):
    """Explain the selected CT layer; adds one map layer per method × target."""

    def __init__(self, napari_viewer):
        self._viewer = napari_viewer
        self.ct_layer = ComboBox(label="CT layer", choices=self._ct_choices, nullable=True)
        self.model_path = FileEdit(
            label="Model",
            mode="d",
            nullable=True,
            value=None,
            tooltip="checkpoint folder or weights file; empty = the shipped model",
        )
        self.methods = Select(label="Methods", choices=method_names(), value=["cdam"])
        targets = default_target_names()
        self.targets = Select(
            label="Targets", choices=targets, value=[t for t in DEFAULT_TARGETS if t in targets] or targets[:1]
        )
        self.device = ComboBox(label="Device", choices=list(DEVICE_CHOICES), value="auto")
        self.batch_size = SpinBox(label="Batch size", value=16, min=1, max=1024)
        self.blending = ComboBox(label="Blending", choices=list(OVERLAY_BLENDINGS), value="translucent")
        self.run_button = PushButton(text="Explain")
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = Label(label="Status", value="")
        self.scores = Table(label="Scores", value=None)
        super().__init__(
            widgets=[
                self.ct_layer,
                self.model_path,
                self.methods,
                self.targets,
                self.device,
                self.batch_size,
                self.blending,
                self.run_button,
                self.progress,
                self.status,
                self.scores,
            ]
        )
        self.worker = None
        self.result = None
        self.added_layers: list[Any] = []
        self._relay = _Relay()
        self._relay.advanced.connect(self._advance)
        self.run_button.changed.connect(self.run)
        napari_viewer.layers.events.inserted.connect(self._refresh)
        napari_viewer.layers.events.removed.connect(self._refresh)
        self._refresh()

    # -- choices -----------------------------------------------------------------------------------
    def _ct_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Image)
            and layer.ndim == 3
            and not getattr(layer, "rgb", False)
            and (layer.metadata or {}).get("medvit", {}).get("kind") != "overlay"
        ]

    def _refresh(self, _event=None) -> None:
        current = self.ct_layer.value
        self.ct_layer.reset_choices()
        choices = [value for _, value in self._ct_choices()]
        if current in choices:
            self.ct_layer.value = current
        elif choices:
            self.ct_layer.value = choices[-1]

    # -- running -----------------------------------------------------------------------------------
    def run(self, _=None):
        """Start explaining the chosen CT layer in a worker thread; returns the worker (or None)."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            self._say("already running")
            return None
        layer = self.ct_layer.value
        methods, targets = list(self.methods.value), list(self.targets.value)
        problem = (
            "choose a CT layer"
            if layer is None
            else "choose at least one method"
            if not methods
            else "choose at least one target"
            if not targets
            else None
        )
        if problem:
            self._say(problem)
            return None
        try:
            volume = volume_from_layer(layer)
        except ValueError as exc:
            self._say(str(exc))
            return None
        # torch / timm / torchvision are imported here, on the GUI thread: importing them for the first
        # time inside the worker thread while Qt runs its event loop can crash the process
        from .. import model as _model  # noqa: F401
        from .. import pipeline as _pipeline  # noqa: F401

        self.progress.max = max(1, _slice_count(volume))
        self.progress.value = 0
        self._say(f"explaining {layer.name} ({', '.join(methods)} × {', '.join(targets)}) …")
        self.run_button.enabled = False
        self.worker = create_worker(
            _explain,
            volume,
            self.model_path.value,
            self.device.value,
            methods,
            targets,
            int(self.batch_size.value),
            self._relay.advanced.emit,
            _start_thread=False,
            _connect={"errored": self._failed},  # handled here: shown, not re-raised in the event loop
        )
        self.worker.returned.connect(lambda result: self._show(result, layer))
        self.worker.finished.connect(self._finished)
        self.worker.start()
        return self.worker

    def _advance(self, n: int) -> None:
        self.progress.value = min(self.progress.max, self.progress.value + int(n))

    def _finished(self) -> None:
        self.worker = None
        self.run_button.enabled = True

    def _failed(self, exc: BaseException) -> None:
        # napari's worker also posts the exception to its notification manager
        message = " ".join(str(exc).split()) or type(exc).__name__
        self._say("error: " + message)

    def _say(self, text: str) -> None:
        self.status.value = text

    # -- results -----------------------------------------------------------------------------------
    def _show(self, result, ct_layer) -> None:
        self.result = result
        self.progress.value = self.progress.max
        blending = self.blending.value
        for method in result.methods:
            for target in result.targets:
                data, kwargs, _ = lazy_overlay_layer_data(
                    result, method, target, name=f"{ct_layer.name} {method}/{target}", blending=blending
                )
                self.added_layers.append(self._viewer.add_image(data, **kwargs))
        table = result.predictions
        columns = [c for c in SCORE_COLUMNS_FIRST if c in table.columns]
        columns += [c for c in table.columns if c not in columns]
        self.scores.value = {
            "data": [[row.get(c) for c in columns] for row in table.rows],
            "index": [str(i) for i in range(len(table.rows))],
            "columns": columns,
        }
        best = top_slice(table.rows)
        if best is not None and "z_mm" in best and ct_layer.ndim == 3:
            self._go_to(ct_layer, result, best)
            self._say(
                f"done; highest malignancy_prob {best.get('malignancy_prob', float('nan')):.3f} at "
                f"slice {best.get('slice')} (z = {best['z_mm']:.1f} mm)"
            )
        else:
            self._say("done")

    def _go_to(self, ct_layer, result, row) -> None:
        """Move the slider to the world position of the row's slice (its centre voxel)."""
        axis = _slice_axis(result.volume)
        index = np.array(result.volume.shape, dtype=np.float64) / 2 - 0.5
        index[axis] = row["source_index"]
        world = ct_layer.data_to_world(index[::-1])  # data axes are [Z, Y, X]
        step = list(self._viewer.dims.point)
        step[-3:] = [float(v) for v in world][-3:]
        self._viewer.dims.point = step


def _explain(volume, model_path, device, methods, targets, batch_size, progress):
    from ..model import load_model
    from ..pipeline import explain_volume

    model = load_model(model_path, device=device)
    return explain_volume(model, volume, methods, targets, batch_size=batch_size, progress=progress)


def _slice_axis(volume) -> int:
    """The voxel axis closest to the patient's superior–inferior direction (the axial slicing axis)."""
    return int(np.argmax(np.abs(volume.direction[2, :])))


def _slice_count(volume) -> int:
    return int(volume.shape[_slice_axis(volume)])
