"""The HTML report of a volumetric model: three orthogonal planes per ROI cube, or through the map's maximum
for a whole-volume input; the plane cutting checked voxel by voxel on oblique and flipped grids."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medvit_explain.io import load_volume
from medvit_explain.orientation import orientation_of, reoriented_view
from medvit_explain.pipeline import explain_volume
from medvit_explain.report import figures, render_report, top_entries, write_report
from medvit_explain.report.figures import PLANES, display_plane, plane_aspect
from medvit_explain.volume import Volume

from .conftest import GEOMETRIES
from .models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["cdam", "agcam"]
TARGETS = ["malignancy", "subtlety"]


@pytest.fixture(scope="module")
def ct() -> Volume:
    return load_volume(ROOT / "sample_data" / "phantom_001.nii.gz")


@pytest.fixture(scope="module")
def cube_result(ct):
    mask = load_volume(ROOT / "sample_data" / "phantom_001_nodules.nii.gz")
    model = tiny_model(image_size=(16, 32, 16), patch=8, mode="roi")
    return explain_volume(model, ct, METHODS, TARGETS, roi_mask=mask)


@pytest.fixture(scope="module")
def volume_result(ct):
    model = tiny_model(image_size=(16, 32, 32), patch=8, mode="volume", crop_body=True)
    return explain_volume(model, ct, METHODS, TARGETS)


def _captions(text: str) -> list[str]:
    return re.findall(r'<h4 class="plane">([^<]*)</h4>', text)


def _png_count(text: str) -> int:
    return len(re.findall(r'<img[^>]*src="data:image/png;base64,', text))


@pytest.fixture
def grids(monkeypatch) -> list[dict]:
    """Every ``slice_grid`` call of a report: its arguments (and a stub PNG, to stay fast)."""
    calls: list[dict] = []

    def record(ct, maps, **kwargs):
        calls.append({"ct": ct, "maps": maps, **kwargs})
        return b"png"

    monkeypatch.setattr(figures, "slice_grid", record)
    return calls


def _source_index(canon, ornt, shape) -> tuple[int, int, int]:
    """By hand: source axis ``a`` goes to canonical axis ``ornt[a, 0]``, reversed where ``ornt[a, 1]`` is -1."""
    out = []
    for a in range(3):
        target, flip = int(ornt[a, 0]), int(ornt[a, 1])
        out.append(shape[a] - 1 - canon[target] if flip == -1 else canon[target])
    return tuple(out)


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
@pytest.mark.parametrize("centre,half", [((3, 2, 4), (2, 1, 2)), ((0, 5, 1), (2, 3, 2)), ((4, 3, 2), None)])
def test_display_plane_holds_the_source_voxels(name, direction, spacing, centre, half):
    """Each displayed pixel of each plane is the source voxel reached by hand through the ornt mapping, and
    the display runs the right way in patient space (checked on the affine): cols to patient left (axial,
    coronal) or posterior (sagittal), rows to posterior (axial) or inferior (coronal, sagittal)."""
    shape = (7, 6, 5)
    volume = Volume(np.random.default_rng(1).normal(size=shape), (4.0, -2.0, 9.0), spacing, direction)
    ornt = orientation_of(volume)
    canonical = reoriented_view(volume.array, ornt)
    canon_shape = canonical.shape
    spacing_canon = np.asarray(spacing)[np.argsort(ornt[:, 0])]
    # canonical axis (and its direction) along displayed (rows, cols), and the axis cut across
    layout = {"axial": ((1, 1), (0, 1), 2), "coronal": ((2, -1), (0, 1), 1), "sagittal": ((2, -1), (1, 1), 0)}
    for plane in PLANES:
        image = display_plane(canonical, plane, centre, half)
        (row_axis, row_dir), (col_axis, col_dir), normal = layout[plane]
        lo = [0 if half is None else max(c - h, 0) for c, h in zip(centre, half or (0, 0, 0))]
        hi = [n if half is None else min(c + h + 1, n) for c, h, n in zip(centre, half or (0, 0, 0), canon_shape)]
        assert image.shape == (hi[row_axis] - lo[row_axis], hi[col_axis] - lo[col_axis])
        points = np.zeros((*image.shape, 3))
        for r in range(image.shape[0]):
            for c in range(image.shape[1]):
                canon = [0, 0, 0]
                canon[normal] = centre[normal]
                canon[row_axis] = lo[row_axis] + r if row_dir == 1 else hi[row_axis] - 1 - r
                canon[col_axis] = lo[col_axis] + c
                ijk = _source_index(canon, ornt, shape)
                assert image[r, c] == volume.array[ijk], (plane, r, c)
                points[r, c] = volume.index_to_physical(np.array(ijk, dtype=float))
        down, right = points[1, 0] - points[0, 0], points[0, 1] - points[0, 0]
        # LPS: +x patient left, +y posterior, +z superior; the dominant component of each step
        want_down = {"axial": (1, 1), "coronal": (2, -1), "sagittal": (2, -1)}[plane]
        want_right = {"axial": (0, 1), "coronal": (0, 1), "sagittal": (1, 1)}[plane]
        for step, (axis, sign) in ((down, want_down), (right, want_right)):
            assert int(np.argmax(np.abs(step))) == axis and np.sign(step[axis]) == sign, (plane, step)
        assert plane_aspect(spacing_canon, plane) == pytest.approx(np.linalg.norm(down) / np.linalg.norm(right))


def test_cube_report_has_three_planes_per_top_roi(cube_result, tmp_path):
    text = write_report(cube_result, tmp_path / "cube.html").read_text(encoding="utf-8")
    top = top_entries(cube_result, 3)
    assert len(top) == 2  # the phantom's two nodules
    captions = _captions(text)
    want = [
        f"ROI {e['row']['roi']} (label {e['row']['label']}), {p} plane through its centre, a 32 mm window"
        for e in top
        for p in PLANES
    ]
    assert captions == want
    assert _png_count(text) == 1 + 3 * len(top)  # the probability bars, then a grid per plane
    assert "one input per ROI (the whole cube)" in text and "Bars: views averaged" not in text
    assert "Top 2 ROIs: maps" in text and "per ROI" in text


def test_cube_report_projects_each_map_once_and_matches_the_axial_display(cube_result, grids, monkeypatch):
    calls = []
    original = cube_result.map_array

    def counting(method, target):
        calls.append((method, target))
        return original(method, target)

    monkeypatch.setattr(cube_result, "map_array", counting)
    render_report(cube_result)
    assert sorted(calls) == sorted((m, t) for m in METHODS for t in TARGETS)
    monkeypatch.undo()  # display_slice below may project again
    top = top_entries(cube_result, 3)
    assert len(grids) == 3 * len(top)
    for i, entry in enumerate(top):
        axial = grids[3 * i]  # the axial plane is the one the 2D ROI report shows: same pixels, same aspect
        k, window = entry["slice"], entry["window"]
        np.testing.assert_array_equal(axial["ct"], cube_result.display_slice(k)[window])
        for m in METHODS:
            for t in TARGETS:
                np.testing.assert_allclose(axial["maps"][m][t], cube_result.display_slice(k, m, t)[window], atol=1e-6)
        assert axial["aspect"] == pytest.approx(cube_result.display_aspect())
        assert list(axial["maps"]) == METHODS and list(axial["maps"][METHODS[0]]) == TARGETS
        spacing = cube_result.volume.spacing  # identity direction: canonical = source axes
        for call, (rows, cols) in zip(grids[3 * i + 1 : 3 * i + 3], ((2, 0), (2, 1)), strict=True):
            assert call["aspect"] == pytest.approx(spacing[rows] / spacing[cols])
            assert call["ct"].shape == (2 * entry["half"][rows] + 1, 2 * entry["half"][cols] + 1)


def test_volume_report_centres_on_the_map_maximum(volume_result, tmp_path):
    text = write_report(volume_result, tmp_path / "volume.html").read_text(encoding="utf-8")
    assert "Whole volume: maps" in text and "Top " not in text and "per slice" not in text
    prob = volume_result.predictions.rows[0]["malignancy_prob"]
    assert f'P(malignancy) of the whole volume = <span class="hot">{prob:.3g}</span>' in text
    source = volume_result.map_array(METHODS[0], "malignancy")
    voxel = tuple(int(v) for v in np.unravel_index(np.argmax(source), source.shape))
    assert f"Planes through source voxel {voxel}, where the cdam map of malignancy is largest" in text
    assert _captions(text) == [f"whole volume, {p} plane through voxel {voxel}" for p in PLANES]
    assert _png_count(text) == 3  # no probability plot: one input
    assert re.search(r"<th[^>]*>volume</th>", text)  # the predicted values table keeps the volume column


def test_volume_report_planes_hold_the_maximum(volume_result, grids):
    render_report(volume_result)
    source = volume_result.map_array(METHODS[0], "malignancy")
    assert len(grids) == 3
    shape = reoriented_view(source, volume_result.inputs.ornt).shape
    full = {"axial": (shape[1], shape[0]), "coronal": (shape[2], shape[0]), "sagittal": (shape[2], shape[1])}
    for plane, call in zip(PLANES, grids, strict=True):
        assert call["ct"].shape == full[plane]  # the whole field of view
        assert call["maps"][METHODS[0]]["malignancy"].max() == source.max()
