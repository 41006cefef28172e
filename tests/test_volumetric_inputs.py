"""Volumetric model inputs and their inverses: every model voxel traces back to the right source voxel, and a
map written back lands where its model voxels came from (anisotropic, flipped, permuted and oblique grids).

The references use a CT whose HU is linear in the source voxel index and a map linear in the model voxel
index: trilinear interpolation (both ways) reproduces a linear function exactly wherever it does not clamp
at a border, so the checks are exact, not "close to a blur"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medvit_explain.prediction import model_inputs
from medvit_explain.transforms import reoriented_view
from medvit_explain.volume import Volume
from medvit_explain.volumetric_inputs import CubeInputs, VolumeInputs
from tests.models import tiny_model

from .conftest import GEOMETRIES

WINDOW = (-3000.0, 3000.0)  # wide: the linear HU never clips
SLOPE = np.array([7.0, -5.0, 11.0])


def linear_volume(direction, spacing, shape=(40, 36, 30)):
    i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij")
    hu = SLOPE[0] * i + SLOPE[1] * j + SLOPE[2] * k - 200.0
    return Volume(hu.astype(np.float32), (5.0, -3.0, 11.0), spacing, direction)


def hu_at(index):
    return float(SLOPE @ np.asarray(index) - 200.0)


def scaled(hu):
    return (hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0])


def preprocessing(size, mode, size_mm=12.0, spacing_mm=1.0):
    return {
        "mode": mode,
        "image_size": list(size),
        "in_chans": 1,
        "hu_window": list(WINDOW),
        "crop_body": False,
        "roi": {"size_mm": size_mm, "spacing_mm": spacing_mm, "views": ["axial"]},
    }


def affine_fit(points_model, points_source):
    """The affine map model voxel → source voxel, fitted from matching points (it is exactly affine)."""
    a = np.c_[points_model, np.ones(len(points_model))]
    coef, *_ = np.linalg.lstsq(a, points_source, rcond=None)
    return coef  # [4, 3]


def model_coords_of_source(coef, source_ijk):
    """Invert the fitted affine: source voxel indices [N, 3] → model voxel coordinates [N, 3]."""
    m, t = coef[:3].T, coef[3]
    return np.linalg.solve(m, (np.asarray(source_ijk, float) - t).T).T


def corner_points(size):
    return np.array([[d, r, c] for d in (0, size[0] - 1) for r in (0, size[1] - 1) for c in (0, size[2] - 1)], float)


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_cube_inputs_sample_the_cube_in_model_axis_order(name, direction, spacing):
    volume = linear_volume(direction, spacing)
    centre = volume.index_to_physical(np.array([19.5, 17.0, 14.0]))
    size = (12, 12, 12)  # n = 12 mm / 1 mm: no resize
    inputs = CubeInputs(volume, preprocessing(size, "roi"), centre[None])
    images = inputs.images()
    assert images.shape == (1, 1, *size)
    for d, r, c in [(0, 0, 0), (11, 11, 11), (3, 7, 5), (6, 2, 9)]:
        src = inputs.voxel_to_source(0, d, r, c)
        assert float(images[0, 0, d, r, c]) == pytest.approx(scaled(hu_at(src)), abs=1e-5)
    # D runs inferior → superior, H anterior → posterior, W patient right → left (LPS: +z, +y, +x)
    origin = volume.index_to_physical(inputs.voxel_to_source(0, 5, 5, 5))
    for axis, lps in ((0, 2), (1, 1), (2, 0)):
        step = [5, 5, 5]
        step[axis] += 1
        moved = volume.index_to_physical(inputs.voxel_to_source(0, *step)) - origin
        assert moved[lps] == pytest.approx(1.0, abs=0.35), (axis, moved)  # about one 1 mm sample along that axis


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_cube_map_lands_where_its_voxels_came_from(name, direction, spacing):
    volume = linear_volume(direction, spacing)
    centre = volume.index_to_physical(np.array([20.0, 18.0, 15.0]))
    size = (8, 12, 10)  # resized: 12 cube samples → an 8 × 12 × 10 box
    inputs = CubeInputs(volume, preprocessing(size, "roi"), centre[None])
    assert inputs.n == 12
    # a map linear in the model voxel index, given at the model box's resolution
    dd, rr, cc = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in size], indexing="ij")
    slope = np.array([0.5, -0.25, 0.125])
    map_box = torch.from_numpy((slope[0] * dd + slope[1] * rr + slope[2] * cc + 3.0).astype(np.float32))[None]
    out = inputs.project(map_box)
    assert out.shape == volume.shape
    # the box → cube resize is linear, so model → source is affine: fit it on the cube's corners
    pts = corner_points(size)
    # model voxel (d, r, c) sits at cube sample ((v + 0.5) · n / size − 0.5): voxel_to_source includes that
    coef = affine_fit(pts, np.array([inputs.voxel_to_source(0, *p) for p in pts]))
    ijk = np.argwhere(out != 0)
    assert len(ijk) > 100
    coords = model_coords_of_source(coef, ijk)
    # interior: away from the clamped half sample at each border, both resizes are exact on a linear map
    margin = np.array([(s / 12) * 1.0 for s in size])
    interior = np.all((coords >= margin) & (coords <= np.array(size) - 1 - margin), axis=1)
    assert interior.sum() > 50
    want = coords[interior] @ slope + 3.0
    got = out[tuple(ijk[interior].T)]
    np.testing.assert_allclose(got, want, atol=1e-4)
    # nothing outside the cube: cube samples −0.5 … n − 0.5 are model coordinates −0.5 … size − 0.5
    inside_cube = np.all((coords >= -0.5 - 1e-6) & (coords <= np.array(size) - 0.5 + 1e-6), axis=1)
    assert inside_cube.all()


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_volume_inputs_and_inverse_are_exact(name, direction, spacing):
    volume = linear_volume(direction, spacing, shape=(20, 18, 14))
    size = (8, 12, 16)
    inputs = VolumeInputs(volume, preprocessing(size, "volume"))
    images = inputs.images()
    assert images.shape == (1, 1, *size)
    n_slices, rows, cols = inputs.crop_shape
    # each model voxel is the trilinear resample of the canonical volume: exact on a linear CT (interior)
    for d, r, c in [(3, 5, 7), (4, 6, 8), (2, 9, 11)]:
        src = inputs.voxel_to_source(d, r, c)
        assert float(images[0, 0, d, r, c]) == pytest.approx(scaled(hu_at(src)), abs=2e-5)
    dd, rr, cc = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in size], indexing="ij")
    slope = np.array([0.5, -0.25, 0.125])
    map_box = torch.from_numpy((slope[0] * dd + slope[1] * rr + slope[2] * cc).astype(np.float32))[None]
    out = inputs.project(map_box)
    pts = corner_points(size)
    coef = affine_fit(pts, np.array([inputs.voxel_to_source(*p) for p in pts]))
    ijk = np.argwhere(np.ones(volume.shape, bool))
    coords = model_coords_of_source(coef, ijk)
    interior = np.all((coords >= 0) & (coords <= np.array(size) - 1), axis=1)
    assert interior.sum() > 100
    np.testing.assert_allclose(out[tuple(ijk[interior].T)], coords[interior] @ slope, atol=1e-4)
    # canonical slices (computed alone) equal the full projection's
    canon = reoriented_view(out, inputs.ornt)
    some = [0, n_slices // 2, n_slices - 1]
    np.testing.assert_allclose(inputs.canonical_slices(map_box, some), canon[:, :, some], atol=1e-6)
    # blocks of source planes (what napari asks for; only those slices when the third axis is the slicing
    # one) equal the full projection's
    depth = volume.shape[2]
    for z0, z1 in [(0, depth), (0, 3), (5, 9), (depth - 1, depth)]:
        np.testing.assert_allclose(inputs.project_planes(map_box, z0, z1), out[:, :, z0:z1], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_volume_maps_still_on_the_gpu_project_as_on_the_cpu():
    """A whole-volume map straight from a GPU run (the Python API's ``map_array``, the bench's memory case)
    projects onto the source grid as the same map on the CPU does."""
    volume = linear_volume(np.eye(3), (0.8, 0.8, 2.0), shape=(20, 18, 14))
    inputs = VolumeInputs(volume, preprocessing((8, 12, 16), "volume"))
    maps = torch.rand((1, 4, 6, 8), generator=torch.Generator().manual_seed(0))
    on_cpu = inputs.project(maps)
    np.testing.assert_allclose(inputs.project(maps.cuda()), on_cpu, atol=1e-5)
    np.testing.assert_allclose(
        inputs.canonical_slices(maps.cuda(), [0, 5, 13]), inputs.canonical_slices(maps, [0, 5, 13]), atol=1e-5
    )
    np.testing.assert_allclose(inputs.project_planes(maps.cuda(), 2, 9), on_cpu[:, :, 2:9], atol=1e-5)


def test_model_inputs_pick_the_volumetric_classes_and_refuse_mismatches():
    volume = linear_volume(np.eye(3), (1.0, 1.0, 2.0))
    cube_model = tiny_model(image_size=(16, 16, 16), patch=8, mode="roi")
    centre = volume.index_to_physical(np.array([20.0, 18.0, 15.0]))[None]
    assert isinstance(model_inputs(cube_model, volume, roi_centers=centre), CubeInputs)
    with pytest.raises(Exception, match="this model expects nodule ROIs"):
        model_inputs(cube_model, volume)
    whole = tiny_model(image_size=(16, 16, 16), patch=8, mode="volume")
    assert isinstance(model_inputs(whole, volume), VolumeInputs)
    with pytest.raises(Exception, match=r"explains whole volumes \(preprocessing mode volume\), not nodule ROIs"):
        model_inputs(whole, volume, roi_centers=centre)


@pytest.mark.parametrize(
    "channels", [{"recipe": "copies"}, {"recipe": "hu_windows", "windows": [[-1000, 400], [-160, 240]]}]
)
def test_volume_input_made_in_chunks_equals_the_whole_block_resized_at_once(channels):
    """The whole-volume input is windowed and resized chunk by chunk (separable trilinear); it equals the
    plain chain (``channel_images`` on the whole cropped block, MONAI's order: window → resize → channels →
    normalise) to float rounding, over more slices than one chunk."""
    from medvit_explain.io import load_volume
    from medvit_explain.transforms import Preprocessing, channel_images
    from medvit_explain.volumetric_inputs import model_order

    volume = load_volume(Path(__file__).resolve().parents[1] / "sample_data" / "phantom_001.nii.gz")
    assert volume.shape[2] > 32
    pre = {
        "mode": "volume",
        "image_size": [16, 48, 40],
        "in_chans": 2,
        "hu_window": [-1000, 400],
        "crop_body": True,
        "channels": channels,
        "mean": [0.1, 0.2],
        "std": [0.5, 2.0],
    }
    inputs = VolumeInputs(volume, pre)
    x0, x1, y0, y1 = inputs.box
    block = np.ascontiguousarray(model_order(inputs.canonical[x0:x1, y0:y1]), dtype=np.float32)
    want = channel_images(Preprocessing.from_config(pre), torch.from_numpy(block)[None])
    torch.testing.assert_close(inputs.images(), want, rtol=0, atol=1e-6)
