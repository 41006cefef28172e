"""docs/napari.png: napari (the plugin's reader + its widget docked) on the sample phantom and the CLI's CDAM
overlay; with ``--roi``, docs/napari_roi.png: the widget explaining nodule ROIs from a Points layer::

    .venv/bin/medvit-explain explain sample_data/phantom_001.nii.gz --method cdam --target malignancy --out /tmp/x
    xvfb-run -a -s "-screen 0 1600x900x24" env QT_QPA_PLATFORM=xcb \\
        .venv/bin/python scripts/napari_screenshot.py /tmp/x docs/napari.png
    xvfb-run -a -s "-screen 0 1600x900x24" env QT_QPA_PLATFORM=xcb \\
        .venv/bin/python scripts/napari_screenshot.py --roi docs/napari_roi.png

``--roi``: one point on each labelled nodule of ``sample_data/phantom_001`` (its JSON's centres, LPS mm, which
are napari's world coordinates reversed), chosen as *Nodule centres*; the shipped ``sample-roi`` explains them
(CDAM, malignancy) and the view goes to the most malignant nodule.

Needs a display (Xvfb): the offscreen Qt platform has no OpenGL for napari's canvas. torch is imported
before Qt (on this machine loading triton's native module after PyQt5's libraries segfaults).
"""

import json
import sys
import time
import warnings
from pathlib import Path

# isort: off
import medvit_explain.model  # noqa: F401  torch before Qt
import medvit_explain.pipeline  # noqa: F401
import napari
import numpy as np
from npe2 import PluginManager, PluginManifest
from qtpy.QtWidgets import QApplication

# isort: on

from medvit_explain.napari._widget import ExplainWidget
from medvit_explain.viewer_logic import parse_predictions, top_slice

ROOT = Path(__file__).resolve().parents[1]


def open_viewer():
    """A shown viewer with our plugin registered, and the widget docked."""
    pm = PluginManager.instance()
    if "medvit-explain" not in pm._manifests:
        pm.register(PluginManifest.from_file(ROOT / "medvit_explain/napari/napari.yaml"))
    warnings.filterwarnings("ignore", message="napari support for the PyQt5")
    viewer = napari.Viewer(show=True)
    widget = ExplainWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Explain (CDAM / AG-CAM)", area="right")
    return viewer, widget


def run_widget(widget, ct, methods, targets) -> None:
    """Explain ``ct`` with the widget and wait for it (the Qt events processed meanwhile)."""
    widget.ct_layer.value = ct
    widget.device.value = "cpu"
    widget.methods.value = methods
    widget.targets.value = targets
    widget.run()
    start = time.time()
    while widget.worker is not None and time.time() - start < 300:
        QApplication.processEvents()
        time.sleep(0.02)
    print(widget.status.value)


def save(viewer, target: Path) -> None:
    """The whole window at 1600 x 900 (the PyQt5-deprecation toast hidden) to ``target``."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    viewer.window._qt_window.resize(1600, 900)
    viewer.reset_view()
    for _ in range(20):
        QApplication.processEvents()
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.hide()
    QApplication.processEvents()
    viewer.screenshot(str(target), canvas_only=False, flash=False)
    print("wrote", target)
    viewer.close()


def cli_overlay(out_dir: Path, target: Path) -> None:
    """The CT, its nodule outlines and the CLI's CDAM overlay; the widget's own run docked beside."""
    viewer, widget = open_viewer()
    [ct] = viewer.open(str(ROOT / "sample_data/phantom_001.nii.gz"), plugin="medvit-explain")
    [nodules] = viewer.open(str(ROOT / "sample_data/phantom_001_nodules.nii.gz"), plugin="medvit-explain")
    [overlay] = viewer.open(str(out_dir / "phantom_001_cdam_malignancy.nii.gz"), plugin="medvit-explain")
    nodules.contour = 1
    nodules.opacity = 1.0
    viewer.layers.move(viewer.layers.index(nodules), len(viewer.layers))  # outlines on top
    viewer.layers.selection.active = overlay
    for layer in (ct, nodules, overlay):
        print(layer.name, type(layer).__name__, layer.metadata["medvit"]["reason"])
    run_widget(widget, ct, ["agcam"], ["malignancy"])
    for layer in widget.added_layers:
        layer.visible = False  # the canvas shows the CLI's CDAM overlay; the widget's AG-CAM map stays in the list
    viewer.layers.selection.active = overlay  # its colour bar is the one shown
    _, rows = parse_predictions(out_dir / "predictions.csv")
    best = top_slice(rows)
    row = [r["source_index"] for r in widget._rows].index(best["source_index"])
    widget.scores.native.selectRow(row)
    widget.go_to_row(row)
    colorbars = [layer.colorbar.visible for layer in viewer.layers if hasattr(layer, "colorbar")]
    print("slice", best["source_index"], "p", best["malignancy_prob"], "colorbars", colorbars)
    save(viewer, target)


def roi_points(target: Path) -> None:
    """A point on each nodule chosen as the widget's nodule centres: sample-roi's CDAM malignancy maps."""
    viewer, widget = open_viewer()
    [ct] = viewer.open(str(ROOT / "sample_data/phantom_001.nii.gz"), plugin="medvit-explain")
    nodules = json.loads((ROOT / "sample_data/phantom_001.json").read_text())["nodules"]
    lps = np.array([n["center_mm"] for n in nodules], dtype=np.float64)
    points = viewer.add_points(lps[:, ::-1], name="nodule centres", ndim=3, size=3, face_color="yellow")
    widget.centres.value = points
    run_widget(widget, ct, ["cdam"], ["malignancy"])
    viewer.layers.selection.active = widget.added_layers[-1]
    save(viewer, target)


if sys.argv[1] == "--roi":
    roi_points(Path(sys.argv[2]))
else:
    cli_overlay(Path(sys.argv[1]), Path(sys.argv[2]))
