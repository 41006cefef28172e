"""The HTML report: self-contained, escaped, decodable figures; the headless-Chromium screenshot."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medvit_explain.model import build_model
from medvit_explain.pipeline import explain_volume
from medvit_explain.report import top_entries, write_report
from medvit_explain.report.figures import slice_grid, symmetric_limit
from medvit_explain.volume import Volume

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
TARGETS = ["malignancy", "subtlety", "calcification"]
METHODS = ["cdam", "attention"]
ODD_PATH = '/data/<b>scan</b> & "x".nii.gz'


def tiny_model():
    torch.manual_seed(0)
    return build_model(
        {
            "name": "tiny<report>",
            "architecture": {
                "timm_name": "vit_tiny_patch16_224",
                "kwargs": dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2),
            },
            "task_spec": "lidc",
            "preprocessing": {
                "mode": "slice",
                "image_size": [32, 32],
                "hu_window": [-1000, 400],
                "roi": {"size_mm": 16, "spacing_mm": 1.0, "views": ["axial", "coronal", "sagittal"]},
            },
        }
    ).eval()


def small_volume() -> Volume:
    """48 × 40 × 6 voxels, anisotropic in-plane spacing, a bright blob on slices 2-3."""
    rng = np.random.default_rng(0)
    arr = rng.normal(-800, 60, (48, 40, 6)).astype(np.float32)
    arr[18:30, 14:24, 2:4] = 40.0
    return Volume(
        arr,
        (-20.0, -15.0, 0.0),
        (0.8, 1.2, 2.5),
        np.eye(3),
        {"path": ODD_PATH, "format": "nifti", "modality": "CT", "sha256": "ab" * 32},
    )


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def result(model):
    return explain_volume(model, small_volume(), METHODS, TARGETS, batch_size=4)


@pytest.fixture(scope="module")
def report(result, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "out" / "report.html"
    assert write_report(result, path) == path
    return path


def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_report_is_self_contained(report):
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text, flags=re.I)
    assert links and all(link.startswith("data:image/png;base64,") for link in links), links[:3]
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]  # nothing left from the temp write


def test_report_figures_decode(report, result):
    pngs = _pngs(report.read_text(encoding="utf-8"))
    # the probability plot + one grid per top slice
    assert len(pngs) == 1 + len(top_entries(result, 3)) == 4
    for png in pngs:
        image = Image.open(io.BytesIO(png))
        image.load()
        assert image.format == "PNG" and min(image.size) > 100
        assert np.asarray(image.convert("L"), dtype=np.float64).var() > 0


def test_report_content(report, result):
    text = report.read_text(encoding="utf-8")
    for word in (*TARGETS, *METHODS, "Timings", "torch", "timm", result.device, "ab" * 32):
        assert word in text, word
    # the top slices by malignancy, best first, with their numbers
    top = [t["slice"] for t in result.predictions.summary(top=3)["top_slices"]]
    assert [e["slice"] for e in top_entries(result, 3)] == top
    headings = re.findall(r"<h3>#(\d) &mdash; slice (\d+) ", text)
    assert [(int(r), int(s)) for r, s in headings] == [(i + 1, s) for i, s in enumerate(top)]
    # biomarker table: LIDC scales in the header, the top slices' values in the rows
    assert "subtlety (1–5)" in text and "calcification (1–6)" in text
    row = result.predictions.rows[[r["slice"] for r in result.predictions.rows].index(top[0])]
    assert f"{row['subtlety']:.4g}" in text
    # shape and spacing of the input
    assert "48 × 40 × 6" in text and "0.8 × 1.2 × 2.5" in text


def test_report_escapes_text(report):
    text = report.read_text(encoding="utf-8")
    assert "<b>scan</b>" not in text and "tiny<report>" not in text
    assert "&lt;b&gt;scan&lt;/b&gt; &amp; &quot;x&quot;" in text and "tiny&lt;report&gt;" in text


def test_report_roi_mode(model, tmp_path):
    vol = small_volume()
    centre = vol.index_to_physical(np.array([24.0, 19.0, 2.5]))
    res = explain_volume(model, vol, ["attention"], ["malignancy", "margin"], roi_centers=centre[None])
    entries = top_entries(res, 3)
    assert len(entries) == 1 and entries[0]["slice"] in (2, 3)
    text = write_report(res, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "per ROI" in text and "ROI 0" in text and len(_pngs(text)) == 2


def test_symmetric_limits():
    assert symmetric_limit(np.array([[-3.0, 2.0], [0.5, np.nan]])) == 3.0
    assert symmetric_limit(np.zeros((4, 4))) == 1.0  # a constant map keeps a defined colour scale


def test_slice_grid_colour_scale_is_centred_at_zero():
    """A map with +v and -v/2: red at +v, blue (half-strength) at -v/2, white at 0 (no overlay)."""
    ct = np.full((20, 20), -1000.0)
    m = np.zeros((20, 20))
    m[:, :7], m[:, 13:] = 4.0, -2.0
    image = np.asarray(Image.open(io.BytesIO(slice_grid(ct, {"x": {"t": m}}, overlay=False))).convert("RGB"))
    red = np.all(image == np.array([103, 0, 31]), axis=-1).sum()  # RdBu_r at +1
    white = np.all(image >= 245, axis=-1).sum()
    assert red > 50 and white > 50
    blue_half = (image[..., 2].astype(int) - image[..., 0].astype(int) > 40).sum()
    assert blue_half > 50


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)")
def test_screenshot_script(report, tmp_path):
    out = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(report), str(out), "--height", "1400"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    image = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    assert image.shape == (1400, 1280) and image.var() > 0


def test_screenshot_script_missing_report(tmp_path):
    if not shutil.which("chromium") and not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "screenshot_report.py"),
            str(tmp_path / "none.html"),
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "expected an HTML file" in proc.stderr
