"""The README pictures: the API figure (CT slice + CDAM / AG-CAM maps) and a screenshot of the report.

.venv/bin/python scripts/readme_figures.py [--input sample_data/phantom_000.nii.gz]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import medvit_explain as mx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["malignancy", "spiculation", "diameter"]


def api_figure(input_path: Path, out: Path) -> None:
    volume = mx.load_volume(input_path)
    model = mx.load_model(device="cpu")
    result = mx.explain_volume(model, volume, methods=["cdam", "agcam"], targets=TARGETS)
    k = result.predictions.summary()["max_malignancy_slice"]
    row = result.predictions.rows[k]
    ct = result.display_slice(k)
    aspect = result.display_aspect()
    fig, axes = plt.subplots(2, 1 + len(TARGETS), figsize=(4 * (1 + len(TARGETS)), 8), constrained_layout=True)
    for r, method in enumerate(result.methods):
        axes[r, 0].imshow(ct, cmap="gray", vmin=-1000, vmax=400, aspect=aspect)
        axes[r, 0].set_title(f"slice {k}: p(malignant) = {row['malignancy_prob']:.2f}")
        for c, target in enumerate(TARGETS, start=1):
            m = result.display_slice(k, method, target)
            lim = float(np.abs(m).max()) or 1.0
            axes[r, c].imshow(ct, cmap="gray", vmin=-1000, vmax=400, aspect=aspect)
            im = axes[r, c].imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.6, aspect=aspect)
            axes[r, c].set_title(f"{method.upper()} · {target}")
            fig.colorbar(im, ax=axes[r, c], shrink=0.7)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def report_screenshot(input_path: Path, out: Path) -> None:
    work = ROOT / "runs" / "readme_demo"
    subprocess.run(
        [sys.executable, "-m", "medvit_explain", "explain", str(input_path), "--out", str(work), "--device", "cpu"],
        check=True,
    )
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "screenshot_report.py"),
            str(work / "report.html"),
            str(out),
            "--height",
            "1500",
        ],
        check=True,
    )
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", default=str(ROOT / "sample_data" / "phantom_001.nii.gz"))
    args = parser.parse_args()
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    api_figure(Path(args.input), docs / "explain_api.png")
    report_screenshot(Path(args.input), docs / "report.png")


if __name__ == "__main__":
    main()
