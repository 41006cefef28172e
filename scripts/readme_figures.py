"""The README pictures: the API figure (CT slice + CDAM / AG-CAM maps), a screenshot of the report, the maps
section of the ROI report (sample-roi on the input's labelled nodules, as `make demo`'s ROI step) and the
volumetric figure (sample-roi3d: three orthogonal planes through a spiculated nodule).

.venv/bin/python scripts/readme_figures.py [--input sample_data/phantom_000.nii.gz] [--only report_roi]
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


def report_roi_maps(input_path: Path, out: Path) -> None:
    """The maps section of the ROI report (``explain INPUT --roi-centers INPUT.json``), alone on its page:
    the report's style and that section's HTML, rendered by headless Chromium, trimmed to its content."""
    from PIL import Image

    work = ROOT / "runs" / "readme_demo_roi"
    centres = input_path.with_name(input_path.name.split(".")[0] + ".json")
    subprocess.run(
        [sys.executable, "-m", "medvit_explain", "explain", str(input_path), "--roi-centers", str(centres)]
        + ["--out", str(work), "--device", "cpu"],
        check=True,
    )
    page = (work / "report.html").read_text()
    start = page.index("<h2>Top ")
    section = page[start : page.index("<h2>", start + 4)]
    alone = work / "report_maps.html"
    alone.write_text(page[: page.index("<body>") + len("<body>")] + section + "</body></html>")
    shot = [sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(alone), str(out)]
    subprocess.run(shot + ["--height", "1200"], check=True)
    image = Image.open(out).convert("RGB")
    ink = np.flatnonzero((np.asarray(image).min(axis=2) < 250).any(axis=1))  # rows with anything drawn
    image.crop((0, max(0, int(ink[0]) - 12), image.width, int(ink[-1]) + 16)).save(out)
    print(f"wrote {out}")


ROI3D_TARGETS = ["malignancy", "spiculation", "calcification"]


def roi3d_figure(input_path: Path, out: Path) -> None:
    """sample-roi3d on the nodule with the highest spiculation score: rows = axial, coronal, sagittal planes
    through its centre (a window twice the ROI); columns = the CT, then CDAM for each target, then AG-CAM
    for malignancy. The maps are the 8 × 8 × 8 token grid put back on the CT's own voxel grid."""
    from medvit_explain.orientation import reoriented_view
    from medvit_explain.report import figures
    from medvit_explain.transforms import source_to_canonical_index

    volume = mx.load_volume(input_path)
    mask = mx.load_volume(str(input_path).replace(".nii.gz", "_nodules.nii.gz"))
    model = mx.load_model("sample-roi3d", device="cpu")
    result = mx.explain_volume(model, volume, methods=["cdam", "agcam"], targets=ROI3D_TARGETS, roi_mask=mask)
    nodules = [r for r in result.predictions.rows if r["view"] == "mean"]
    row = max(nodules, key=lambda r: r["spiculation"])
    ornt = result.inputs.ornt
    centre = np.array([row["center_x_mm"], row["center_y_mm"], row["center_z_mm"]])
    canon = np.rint(source_to_canonical_index(volume.physical_to_index(centre), ornt, volume.shape)).astype(int)
    spacing = volume.spacing[np.argsort(ornt[:, 0])]
    half = [int(np.ceil(result.inputs.size_mm / s)) for s in spacing]
    ct = reoriented_view(volume.array, ornt)
    columns = [("CT", None, None)] + [("cdam", "cdam", t) for t in ROI3D_TARGETS] + [("agcam", "agcam", "malignancy")]
    maps = {(m, t): reoriented_view(result.map_array(m, t), ornt) for _, m, t in columns if m}
    cuts = {k: {p: figures.display_plane(v, p, canon, half) for p in figures.PLANES} for k, v in maps.items()}
    limits = {k: max(float(np.abs(c).max()) for c in planes.values()) or 1.0 for k, planes in cuts.items()}
    fig, axes = plt.subplots(3, len(columns), figsize=(3.2 * len(columns), 9.6), constrained_layout=True)
    for r, plane in enumerate(figures.PLANES):
        aspect = figures.plane_aspect(spacing, plane)
        base = figures.display_plane(ct, plane, canon, half)
        for c, (title, method, target) in enumerate(columns):
            ax = axes[r, c]
            ax.imshow(base, cmap="gray", vmin=-1000, vmax=400, aspect=aspect)
            if method:
                m, lim = cuts[(method, target)][plane], limits[(method, target)]  # one scale for the three planes
                opacity = np.clip(np.abs(m) / lim, 0.0, 1.0) * 0.85  # the CT stays visible where the map is ~0
                ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=opacity, aspect=aspect)
                title = f"{method.upper()} · {target}"
            ax.set_title(f"{plane}: {title}" if c == 0 else title, fontsize=9)
            ax.set_axis_off()
    fig.suptitle(
        f"sample-roi3d, ROI {row['roi']}: p(malignant) = {row['malignancy_prob']:.2f}, "
        f"spiculation {row['spiculation']:.1f}, calcification {row['calcification']:.1f}",
        fontsize=10,
    )
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", default=str(ROOT / "sample_data" / "phantom_001.nii.gz"))
    parser.add_argument("--only", choices=["api", "report", "report_roi", "roi3d"], default=None)
    args = parser.parse_args()
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    if args.only in (None, "api"):
        api_figure(Path(args.input), docs / "explain_api.png")
    if args.only in (None, "report"):
        report_screenshot(Path(args.input), docs / "report.png")
    if args.only in (None, "report_roi"):
        report_roi_maps(Path(args.input), docs / "report_roi.png")
    if args.only in (None, "roi3d"):
        roi3d_figure(Path(args.input), docs / "roi3d.png")


if __name__ == "__main__":
    main()
