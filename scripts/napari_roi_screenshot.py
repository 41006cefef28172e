"""docs/napari_roi.png: the napari widget explaining nodule ROIs from a Points layer on the sample phantom::

    xvfb-run -a -s "-screen 0 1600x900x24" env QT_QPA_PLATFORM=xcb \\
        .venv/bin/python scripts/napari_roi_screenshot.py docs/napari_roi.png

One point on each labelled nodule of ``sample_data/phantom_001`` (its JSON's centres, LPS mm, which are
napari's world coordinates reversed), chosen as *Nodule centres*; the shipped ``sample-roi`` explains them
(CDAM, malignancy) and the view goes to the most malignant nodule. Needs a display (Xvfb), as
``scripts/napari_screenshot.py``.
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

ROOT = Path(__file__).resolve().parents[1]
target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "napari_roi.png"
pm = PluginManager.instance()
if "medvit-explain" not in pm._manifests:
    pm.register(PluginManifest.from_file(ROOT / "medvit_explain/napari/napari.yaml"))
warnings.filterwarnings("ignore", message="napari support for the PyQt5")
viewer = napari.Viewer(show=True)
[ct] = viewer.open(str(ROOT / "sample_data/phantom_001.nii.gz"), plugin="medvit-explain")
nodules = json.loads((ROOT / "sample_data/phantom_001.json").read_text())["nodules"]
lps = np.array([n["center_mm"] for n in nodules], dtype=np.float64)
points = viewer.add_points(lps[:, ::-1], name="nodule centres", ndim=3, size=3, face_color="yellow")
widget = ExplainWidget(viewer)
viewer.window.add_dock_widget(widget, name="Explain (CDAM / AG-CAM)", area="right")
widget.ct_layer.value = ct
widget.centres.value = points
widget.device.value = "cpu"
widget.methods.value = ["cdam"]
widget.targets.value = ["malignancy"]
widget.run()
start = time.time()
while widget.worker is not None and time.time() - start < 300:
    QApplication.processEvents()
    time.sleep(0.02)
print(widget.status.value)
viewer.layers.selection.active = widget.added_layers[-1]
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
