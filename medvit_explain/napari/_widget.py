"""The napari dock widget: pick a CT layer, a model, methods, targets and a device, then explain.

With a Points layer chosen as *Nodule centres*, each point is a nodule centre and the run explains an ROI
around each (the CLI's ``--roi-centers``; an empty model field then means the shipped ``sample-roi``): the
maps are zero outside the ROI cubes, the table has a row per view and a ``mean`` row per nodule, the view
goes to the centre of the nodule with the highest malignancy, and a click on a row goes to that nodule.

The explainer (model loading included, so torch is imported only then) runs in a worker thread
(``napari.qt.threading.create_worker``); the UI stays responsive and a progress bar advances after
each batch of slices. Each method × target map is added as an image layer on the CT layer's world grid
(diverging colormap centred at 0, ``translucent`` or ``additive`` blending, a colour bar for the
selected map), the per-slice scores go into a table, and the view jumps to the slice with the highest
malignancy probability; clicking a row of the table jumps to that row's slice.

Cancel stops the run between batches: the progress callback that :func:`~medvit_explain.pipeline.explain_volume`
calls after each batch raises :class:`ExplainCancelled` once Cancel was pressed, the worker returns
nothing (``worker.quit()`` also drops a result that was already on its way) and no layer is added.
Layers are added only once every one of them was built, and removed again if adding one fails, so a
run adds all of its maps or none.
"""

from __future__ import annotations

import threading
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
from ._layers import OVERLAY_BLENDINGS, layer_kind, lazy_overlay_layer_data, volume_from_layer

SCORE_COLUMNS_FIRST = ("slice", "source_index", "z_mm", "roi", "label", "view", "malignancy_prob")
CENTRE_COLUMNS = ("center_x_mm", "center_y_mm", "center_z_mm")  # an ROI row's nodule centre, LPS mm
ROI_MODEL = "sample-roi"  # the model of an ROI run when the model field is empty (as the CLI's default)
DEFAULT_TARGETS = ("malignancy",)


def default_target_names() -> list[str]:
    """Target names of the packaged LIDC task spec (read from its YAML; no torch import)."""
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "model" / "task_lidc.yaml").read_text())
    return [t["name"] for t in spec["targets"]]


class ExplainCancelled(Exception):
    """Raised in the worker thread, between batches, after Cancel was pressed (caught there)."""


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (a queued Qt connection)."""

    advanced = Signal(int)
    sized = Signal(int)  # the run's item count, once the worker knows it (ROI runs: nodules x views)


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
            tooltip="checkpoint folder or weights file; empty = the shipped model (sample-roi with nodule centres)",
        )
        self.centres = ComboBox(
            label="Nodule centres",
            choices=self._points_choices,
            nullable=True,
            value=None,
            tooltip="a Points layer: explain an ROI around each point (an ROI model); empty = every slice",
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
        self.cancel_button = PushButton(text="Cancel", enabled=False, tooltip="stop after the current batch")
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1)
        self.status = Label(label="Status", value="")
        self.scores = Table(label="Scores", value=None, tooltip="click a row to show its slice")
        self.scores.read_only = True
        super().__init__(
            widgets=[
                self.ct_layer,
                self.centres,
                self.model_path,
                self.methods,
                self.targets,
                self.device,
                self.batch_size,
                self.blending,
                self.run_button,
                self.cancel_button,
                self.progress,
                self.status,
                self.scores,
            ]
        )
        self.worker = None
        self.result = None
        self.added_layers: list[Any] = []
        self._shown_on = None  # the CT layer the shown result was computed on
        self._rows: list[dict] = []  # the score table's rows, in its order
        self._cancel = threading.Event()  # a new one per run: a late Cancel never reaches the next run
        self._relay = _Relay()
        self._relay.advanced.connect(self._advance)
        self._relay.sized.connect(self._sized)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.scores.native.cellClicked.connect(lambda row, _col: self.go_to_row(row))
        self.scores.native.currentCellChanged.connect(lambda row, *_: self.go_to_row(row))  # arrow keys
        napari_viewer.layers.events.inserted.connect(self._refresh)
        napari_viewer.layers.events.removed.connect(self._refresh)
        napari_viewer.layers.selection.events.active.connect(self._follow_colorbar)
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
            and layer_kind(layer) != "overlay"
        ]

    def _points_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Points

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Points)]

    def _refresh(self, _event=None) -> None:
        current = self.ct_layer.value
        self.ct_layer.reset_choices()
        choices = [value for _, value in self._ct_choices()]
        if current in choices:
            self.ct_layer.value = current
        elif choices:
            self.ct_layer.value = choices[-1]
        centres = self.centres.value
        self.centres.reset_choices()  # a Points layer is used only when chosen: never picked for the user
        self.centres.value = centres if centres in [value for _, value in self._points_choices()] else None

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
            centres = None if self.centres.value is None else centres_from_points(self.centres.value)
        except ValueError as exc:
            self._say(str(exc))
            return None
        model_path = self.model_path.value
        if centres is not None and model_path is None:
            model_path = ROI_MODEL
        # torch / timm / torchvision are imported here, on the GUI thread: importing them for the first
        # time inside the worker thread while Qt runs its event loop can crash the process
        from .. import model as _model  # noqa: F401
        from .. import pipeline as _pipeline  # noqa: F401

        self.progress.max = max(1, _slice_count(volume)) if centres is None else 0  # 0: busy until sized
        self.progress.value = 0
        where = layer.name if centres is None else f"{len(centres)} ROI(s) of {layer.name}"
        self._say(f"explaining {where} ({', '.join(methods)} × {', '.join(targets)}) …")
        self.run_button.enabled = False
        self._cancel = cancel = threading.Event()
        self.worker = create_worker(
            _explain,
            volume,
            model_path,
            self.device.value,
            methods,
            targets,
            int(self.batch_size.value),
            self._relay.advanced.emit,
            cancel,
            centres,
            self._relay.sized.emit,
            _start_thread=False,
            _connect={"errored": self._failed},  # handled here: shown, not re-raised in the event loop
        )
        self.worker.returned.connect(lambda result: self._show(result, layer, cancel))
        self.worker.finished.connect(self._finished)
        self.cancel_button.enabled = True
        self.worker.start()
        return self.worker

    def cancel(self, _=None) -> None:
        """Stop the running explain after its current batch; nothing of it is added to the viewer."""
        if self.worker is None or self._cancel.is_set():
            return
        self._cancel.set()
        self.worker.quit()  # superqt: the worker's result, if it is already computed, is not emitted
        self.cancel_button.enabled = False
        self._say("cancelling after the current batch …")

    def _sized(self, n: int) -> None:
        self.progress.max = max(1, int(n))

    def _advance(self, n: int) -> None:
        self.progress.value = min(self.progress.max, self.progress.value + int(n))

    def _finished(self) -> None:
        self.worker = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        if self._cancel.is_set():
            self.progress.value = 0
            self._say("cancelled")

    def _failed(self, exc: BaseException) -> None:
        # napari's worker also posts the exception to its notification manager
        message = " ".join(str(exc).split()) or type(exc).__name__
        self._say("error: " + message)

    def _say(self, text: str) -> None:
        self.status.value = text

    # -- results -----------------------------------------------------------------------------------
    def _show(self, result, ct_layer, cancel: threading.Event) -> None:
        if result is None or cancel.is_set():  # cancelled while the result was on its way
            return
        blending = self.blending.value
        built = [
            lazy_overlay_layer_data(result, m, t, name=f"{ct_layer.name} {m}/{t}", blending=blending)
            for m in result.methods
            for t in result.targets
        ]
        added = []
        try:
            for data, kwargs, _ in built:
                added.append(self._viewer.add_image(data, **kwargs))
        except Exception as exc:
            for layer in added:  # all or nothing
                self._viewer.layers.remove(layer)
            self._say(f"error: adding the maps failed, none was added ({' '.join(str(exc).split())})")
            raise  # napari's event loop reports it with its traceback
        self.result, self._shown_on = result, ct_layer
        self.added_layers.extend(added)
        if added and hasattr(added[-1], "colorbar"):
            self._follow_colorbar(layer=added[-1])
        self.progress.max = max(1, self.progress.max)
        self.progress.value = self.progress.max
        table = result.predictions
        columns = [c for c in SCORE_COLUMNS_FIRST if c in table.columns]
        columns += [c for c in table.columns if c not in columns]
        self._rows = list(table.rows)
        self.scores.value = {
            "data": [[row.get(c) for c in columns] for row in self._rows],
            "index": [str(i) for i in range(len(self._rows))],
            "columns": columns,
        }
        best = top_slice(self._rows)
        if best is not None and self._go_to(best):
            where = (
                f"slice {best.get('slice')} (z = {best['z_mm']:.1f} mm)"
                if "z_mm" in best
                else f"ROI {best.get('roi')} (centre {', '.join(f'{best[c]:.1f}' for c in CENTRE_COLUMNS)} mm LPS)"
            )
            self._say(f"done; highest malignancy_prob {best.get('malignancy_prob', float('nan')):.3f} at {where}")
        else:
            self._say("done")

    # -- navigation --------------------------------------------------------------------------------
    def go_to_row(self, row: int) -> bool:
        """Show the slice of row ``row`` of the score table (what a click on the row does)."""
        if not 0 <= row < len(self._rows):
            return False
        return self._go_to(self._rows[row])

    def _go_to(self, row) -> bool:
        """Move the slider to the row's slice of the CT layer as it is shown (an ROI row: to its nodule's
        centre, :meth:`_go_to_centre`).

        The row's ``source_index`` counts along the volume axis the explain sliced (the one that became
        the canonical k); in the layer's ``[Z, Y, X]`` data that is axis ``2 - axis``. The viewer's current
        point is taken to the layer's data coordinates, that coordinate replaced, and the point taken
        back to the world, so the other coordinates stay where they are (and an oblique layer lands on
        exactly that slice: napari slices at the data coordinate of the world point)."""
        layer, result = self._shown_on, self.result
        if layer is None or result is None or layer not in self._viewer.layers:
            return False
        if "source_index" not in row:
            return self._go_to_centre(row)
        data_axis = 2 - _slice_axis(result)
        shape = np.array(layer.data.shape, dtype=np.float64)
        point = np.array(self._viewer.dims.point, dtype=np.float64)
        data = np.clip(np.asarray(layer.world_to_data(point[-3:]), dtype=np.float64), 0, shape - 1)
        data[data_axis] = row["source_index"]
        point[-3:] = np.asarray(layer.data_to_world(data), dtype=np.float64)
        self._viewer.dims.point = tuple(float(v) for v in point)
        return True

    def _go_to_centre(self, row) -> bool:
        """Put the viewer's point on an ROI row's nodule centre (LPS mm; napari's world is LPS in the
        order z, y, x), every slider on it."""
        if not all(isinstance(row.get(c), (int, float)) for c in CENTRE_COLUMNS):
            return False
        point = np.array(self._viewer.dims.point, dtype=np.float64)
        point[-3:] = [float(row[c]) for c in reversed(CENTRE_COLUMNS)]
        self._viewer.dims.point = tuple(float(v) for v in point)
        return True

    def _follow_colorbar(self, event=None, layer=None) -> None:
        """One colour bar: the selected overlay's (each map has its own window)."""
        layer = layer if layer is not None else self._viewer.layers.selection.active
        if layer_kind(layer) != "overlay" or not hasattr(layer, "colorbar"):
            return
        for other in self._viewer.layers:
            if layer_kind(other) == "overlay" and hasattr(other, "colorbar"):
                other.colorbar.visible = other is layer


def centres_from_points(layer) -> np.ndarray:
    """A Points layer's points as nodule centres, LPS mm ``[R, 3]``: each point taken to napari's world
    (the layer's own scale / translate / affine), whose axes are LPS in the order (z, y, x). ValueError
    (one line) for a layer without points or not 3D."""
    data = np.asarray(layer.data, dtype=np.float64)
    if data.ndim != 2 or len(data) == 0:
        raise ValueError(f"the points layer {layer.name!r} has no points: add one on each nodule centre")
    if data.shape[1] < 3:
        raise ValueError(f"the points layer {layer.name!r} is {data.shape[1]}D: nodule centres need 3D points")
    world = np.array([np.asarray(layer.data_to_world(p), dtype=np.float64)[-3:] for p in data])
    return np.ascontiguousarray(world[:, ::-1])


def _explain(
    volume,
    model_path,
    device,
    methods,
    targets,
    batch_size,
    progress,
    cancel: threading.Event,
    centres=None,
    sized=None,
):
    """The worker: the result, or None when ``cancel`` was set (checked after loading and after each batch).
    With ``centres`` (LPS mm) the ROIs around them; ``sized`` gets the item count before the first batch."""
    from ..model import load_model
    from ..pipeline import explain_volume, input_count

    def step(n: int) -> None:
        if cancel.is_set():
            raise ExplainCancelled
        progress(n)

    try:
        model = load_model(model_path, device=device)
        if cancel.is_set():
            return None
        if centres is not None and sized is not None:
            sized(input_count(model, volume, roi_centers=centres))
        return explain_volume(
            model, volume, methods, targets, batch_size=batch_size, progress=step, roi_centers=centres
        )
    except ExplainCancelled:
        return None


def _slice_axis(result_or_volume) -> int:
    """The volume axis that is sliced: the one that became the canonical k (the explain's own ``ornt``),
    or for a bare volume the voxel axis closest to the superior–inferior direction."""
    inputs = getattr(result_or_volume, "inputs", None)
    ornt = getattr(inputs, "ornt", None)
    if ornt is not None:
        return int(np.argsort(np.asarray(ornt)[:, 0])[2])
    volume = getattr(result_or_volume, "volume", result_or_volume)
    return int(np.argmax(np.abs(volume.direction[2, :])))


def _slice_count(volume) -> int:
    return int(volume.shape[_slice_axis(volume)])
