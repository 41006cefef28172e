"""Render Screenshots/MedViTExplain_overlay.png: a matplotlib rendering (NOT a 3D Slicer screen capture)
of what the module shows, from medvit-explain's real output on sample_data/phantom_001.nii.gz.

It uses the module's own display rules (medvit_explain.viewer_logic): the colour table with a transparent
centre, drawn the way Slicer's slice views draw it (an entry's alpha is on/off, the layer's opacity
blends), the window from the 99th percentile of the non-zero |values|, positive-only for AG-CAM, and the
per-slice malignancy chart. Run from a medvit-explain checkout::

    .venv/bin/python plugins/slicer/Screenshots/render_screenshot.py
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from medvit_explain import viewer_logic as vl  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
CT = ROOT / "sample_data" / "phantom_001.nii.gz"
OUT = Path(__file__).resolve().parent / "MedViTExplain_overlay.png"
OPACITY = 0.8


def blend(ct_slice, map_slice, window, signed, fraction=vl.DEFAULT_TRANSPARENT_FRACTION):
    lo, hi = window
    grey = np.clip((ct_slice + 1000.0) / 1400.0, 0, 1)  # Slicer's lung-ish window -1000..400 HU
    rgb = np.repeat(grey[..., None], 3, axis=2)
    colors = np.array(vl.overlay_colors(256, signed, fraction))
    index = np.clip(np.round((map_slice - lo) / (hi - lo) * 255), 0, 255).astype(int)
    rgba = colors[index]
    drawn = (rgba[..., 3] > 0)[..., None]  # Slicer's slice views: any non-zero alpha is drawn
    legend = np.where(colors[:, 3:] > 0, colors[:, :3], 0.9)  # light grey: not drawn (transparent)
    return np.where(drawn, (1 - OPACITY) * rgb + OPACITY * rgba[..., :3], rgb), ListedColormap(legend)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cli = [sys.executable, "-m", "medvit_explain"]
        command = vl.explain_command(
            cli, CT, out, methods=["cdam", "agcam"], targets=["malignancy"], device="cpu", extra_args=["--no-report"]
        )
        subprocess.run(command, check=True)
        ct = sitk.GetArrayFromImage(sitk.ReadImage(str(CT)))
        stem = vl.volume_stem(CT)
        maps = {
            key: sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
            for key, path in vl.find_outputs(out, stem, methods=["cdam", "agcam"]).items()
        }
        _, rows = vl.parse_predictions(out / vl.PREDICTIONS)
    top = vl.top_slice(rows)
    k = int(top["source_index"])

    fig = plt.figure(figsize=(13.5, 5.2), dpi=110)
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 1.1], wspace=0.45)
    for column, (method, hide) in enumerate([("cdam", 10), ("agcam", 30)]):
        array = maps[(method, "malignancy")]
        window = vl.robust_window(array)
        signed = window[0] < 0
        image, cmap = blend(ct[k], array[k], window, signed, hide / 100)
        ax = fig.add_subplot(grid[0, column])
        ax.imshow(image, interpolation="bilinear")
        ax.set_axis_off()
        kind = "signed: blue against, red-yellow for" if signed else "non-negative: positive-only"
        ax.set_title(f"{method} / malignancy, slice k={k}\n{kind}\nhide below {hide} % of the window", fontsize=9)
        bar = fig.colorbar(
            plt.cm.ScalarMappable(norm=plt.Normalize(*window), cmap=cmap), ax=ax, fraction=0.046, pad=0.02
        )
        bar.set_label(f"window {window[0]:.2g} .. {window[1]:.2g}; grey: not drawn", fontsize=8)
    ax = fig.add_subplot(grid[0, 2])
    xs = [r["source_index"] for r in rows]
    ys = [r["malignancy_prob"] for r in rows]
    ax.plot(xs, ys, "-o", color=(0.85, 0.1, 0.1), markersize=3)
    ax.axvline(k, color="0.4", linestyle="--")
    ax.annotate(f"top: p={top['malignancy_prob']:.2f}", (k, top["malignancy_prob"]), xytext=(6, -14),
                textcoords="offset points", fontsize=9)  # fmt: skip
    ax.set_xlabel("slice (k index)")
    ax.set_ylabel("malignancy probability")
    ax.set_ylim(0, 1.02)
    ax.set_title("per-slice malignancy (the module's chart: click a point to go to it)", fontsize=10)
    fig.suptitle(
        "MedViT Explain: a matplotlib rendering of medvit-explain's output on sample_data/phantom_001.nii.gz, "
        "drawn with the module's display rules (not a 3D Slicer screen capture)",
        fontsize=10,
    )
    fig.savefig(OUT, bbox_inches="tight")
    print(OUT)


if __name__ == "__main__":
    main()
