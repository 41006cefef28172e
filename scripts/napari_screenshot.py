"""Headless screenshot of the napari viewer with a CT and a map overlay (run under xvfb-run)."""
import sys
from pathlib import Path

import numpy as np
import torch
import napari
from npe2 import PluginManager, PluginManifest

from medvit_explain.io import write_volume
from medvit_explain.model import build_model, load_model, save_checkpoint
from medvit_explain.phantom import generate_phantom

root = Path("/work/main")
tmp = Path(sys.argv[1]); tmp.mkdir(parents=True, exist_ok=True)
ckpt = sys.argv[2] if len(sys.argv) > 2 else None
pm = PluginManager.instance()
if "medvit-explain" not in pm._manifests:
    pm.register(PluginManifest.from_file(root / "medvit_explain/napari/napari.yaml"))

ph = generate_phantom(3, size=(160, 160, 24), spacing=(2.2, 2.2, 5.0), n_nodules=2)
ct_path = write_volume(ph.ct, tmp / "phantom.nii.gz")
if ckpt is None:
    torch.manual_seed(1)
    model = build_model({"name": "tiny", "architecture": {"timm_name": "vit_tiny_patch16_224", "kwargs":
        dict(img_size=64, patch_size=8, in_chans=1, embed_dim=64, depth=2, num_heads=2)}, "task_spec": "lidc"})
    ckpt = save_checkpoint(model.eval(), tmp / "ckpt")

viewer = napari.Viewer(show=True)
[ct] = viewer.open(str(ct_path), plugin="medvit-explain")
from medvit_explain.napari._widget import ExplainWidget
w = ExplainWidget(viewer)
w.model_path.value = ckpt
w.device.value = "cpu"
w.methods.value = ["cdam"]
w.targets.value = sys.argv[3].split(",") if len(sys.argv) > 3 else ["malignancy"]
worker = w.run()
from qtpy.QtWidgets import QApplication
import time
t0 = time.time()
while w.worker is not None and time.time() - t0 < 120:
    QApplication.processEvents(); time.sleep(0.02)
print(w.status.value)
viewer.window._qt_window.resize(1250, 850)
for l in w.added_layers[:-1]: l.visible = False
import numpy as _np; print("neg frac", [float((_np.asarray(l.data) < 0).mean()) for l in w.added_layers])
# slice through the first nodule
c = ph.nodules[0]["center_mm"] if ph.nodules else None
if c is not None:
    viewer.dims.set_point(0, float(c[2]))
viewer.reset_view()
viewer.screenshot(str(root / "docs/napari_overlay.png"), canvas_only=True)
w_shot = viewer.screenshot(str(tmp / "full.png"), canvas_only=False)
print("ok", [l.name for l in viewer.layers], w.added_layers[0].contrast_limits)
