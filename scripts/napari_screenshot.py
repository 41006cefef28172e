"""docs/napari.png: napari (the plugin's reader + its widget docked) on the sample phantom and the CLI's CDAM
overlay::

    .venv/bin/medvit-explain explain sample_data/phantom_001.nii.gz --method cdam --target malignancy --out /tmp/x
    xvfb-run -a -s "-screen 0 1600x900x24" env QT_QPA_PLATFORM=xcb \\
        .venv/bin/python scripts/napari_screenshot.py /tmp/x docs/napari.png

Needs a display (Xvfb): the offscreen Qt platform has no OpenGL for napari's canvas. torch is imported
before Qt (on this machine loading triton's native module after PyQt5's libraries segfaults).
"""

import sys
import time
import warnings
from pathlib import Path

# isort: off
import medvit_explain.model  # noqa: F401  torch before Qt
import medvit_explain.pipeline  # noqa: F401
import napari
from npe2 import PluginManager, PluginManifest
from qtpy.QtWidgets import QApplication

# isort: on

from medvit_explain.napari._widget import ExplainWidget
from medvit_explain.viewer_logic import parse_predictions, top_slice

ROOT = Path(__file__).resolve().parents[1]
out_dir, target = Path(sys.argv[1]), Path(sys.argv[2])
pm = PluginManager.instance()
if "medvit-explain" not in pm._manifests:
    pm.register(PluginManifest.from_file(ROOT / "medvit_explain/napari/napari.yaml"))
warnings.filterwarnings("ignore", message="napari support for the PyQt5")
viewer = napari.Viewer(show=True)
[ct] = viewer.open(str(ROOT / "sample_data/phantom_001.nii.gz"), plugin="medvit-explain")
[nodules] = viewer.open(str(ROOT / "sample_data/phantom_001_nodules.nii.gz"), plugin="medvit-explain")
[overlay] = viewer.open(str(out_dir / "phantom_001_cdam_malignancy.nii.gz"), plugin="medvit-explain")
nodules.contour = 1
nodules.opacity = 1.0
viewer.layers.move(viewer.layers.index(nodules), len(viewer.layers))  # outlines on top
viewer.layers.selection.active = overlay
for layer in (ct, nodules, overlay):
    print(layer.name, type(layer).__name__, layer.metadata["medvit"]["reason"])
widget = ExplainWidget(viewer)
viewer.window.add_dock_widget(widget, name="Explain (CDAM / AG-CAM)", area="right")
widget.ct_layer.value = ct
widget.device.value = "cpu"
widget.methods.value = ["agcam"]
widget.targets.value = ["malignancy"]
widget.run()
start = time.time()
while widget.worker is not None and time.time() - start < 300:
    QApplication.processEvents()
    time.sleep(0.02)
print(widget.status.value)
for layer in widget.added_layers:
    layer.visible = False  # the canvas shows the CLI's CDAM overlay; the widget's AG-CAM map stays in the list
viewer.layers.selection.active = overlay  # its colour bar is the one shown
_, rows = parse_predictions(out_dir / "predictions.csv")
best = top_slice(rows)
row = [r["source_index"] for r in widget._rows].index(best["source_index"])
widget.scores.native.selectRow(row)
widget.go_to_row(row)
print(
    "slice",
    best["source_index"],
    "p",
    best["malignancy_prob"],
    "colorbars",
    [l.colorbar.visible for l in viewer.layers if hasattr(l, "colorbar")],
)
viewer.window._qt_window.resize(1600, 900)
viewer.reset_view()
for _ in range(20):
    QApplication.processEvents()
from napari._qt.dialogs.qt_notification import NapariQtNotification  # noqa: E402

for toast in viewer.window._qt_window.findChildren(NapariQtNotification):  # the PyQt5-deprecation toast
    toast.hide()
QApplication.processEvents()
viewer.screenshot(str(target), canvas_only=False, flash=False)
print("wrote", target)
viewer.close()
