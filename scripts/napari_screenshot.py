"""Screenshot of napari showing a CT with a map overlay, produced through the plugin's own widget.

    xvfb-run -a -s "-screen 0 1400x1000x24" env QT_QPA_PLATFORM=xcb \\
        .venv/bin/python scripts/napari_screenshot.py docs/napari_overlay.png \\
        [--input sample_data/phantom_000.nii.gz] [--model CKPT] [--method cdam] [--target malignancy]

Needs a display (Xvfb): the offscreen Qt platform has no OpenGL for napari's canvas. torch and timm are
imported before Qt: on this machine (CUDA build of torch with triton, PyQt5 wheels) loading triton's
native module after PyQt5's libraries segfaults.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
from npe2 import PluginManager, PluginManifest
from qtpy.QtWidgets import QApplication

import medvit_explain.model  # noqa: F401  torch / timm before Qt: see the note below
import medvit_explain.pipeline  # noqa: F401
from medvit_explain.napari._widget import ExplainWidget

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--input", default=str(ROOT / "sample_data" / "phantom_001.nii.gz"))
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped sample model)")
    parser.add_argument("--method", default="cdam")
    parser.add_argument("--target", default="malignancy")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()

    manager = PluginManager.instance()
    if "medvit-explain" not in manager._manifests:  # running from a source tree without the entry point
        manager.register(PluginManifest.from_file(ROOT / "medvit_explain" / "napari" / "napari.yaml"))
    viewer = napari.Viewer(show=True)
    viewer.open(args.input, plugin="medvit-explain")
    widget = ExplainWidget(viewer)
    if args.model:
        widget.model_path.value = args.model
    widget.device.value = "cpu"
    widget.methods.value = [args.method]
    widget.targets.value = [args.target]
    widget.run()
    start = time.time()
    while widget.worker is not None and time.time() - start < args.timeout:
        QApplication.processEvents()
        time.sleep(0.02)
    if not widget.added_layers:
        raise SystemExit(f"the widget added no layer: {widget.status.value}")
    viewer.window._qt_window.resize(1250, 850)
    viewer.reset_view()
    viewer.screenshot(args.out, canvas_only=True)
    print(f"wrote {args.out}: layers {[layer.name for layer in viewer.layers]}")


if __name__ == "__main__":
    main()
