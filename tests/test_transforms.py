"""Preprocessing and its inverse: every model pixel traces back to the right source voxel."""

import numpy as np
import pytest
import torch

from medvit_explain.transforms import (
    RoiInputs,
    SliceInputs,
    centers_from_mask,
    reoriented_view,
    resize_planes,
    window,
)
from medvit_explain.volume import Volume

from .conftest import GEOMETRIES

WINDOW = [-1000.0, 400.0]


def windowed(hu):
    return np.clip((np.asarray(hu) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)


def make_volume(direction, spacing, shape=(12, 10, 6), seed=0):
    rng = np.random.default_rng(seed)
    array = rng.uniform(-1000, 400, size=shape).astype(np.float32)
    return Volume(array, (5.0, -3.0, 11.0), spacing, direction)


def canonical_slice_shape(si):
    return si.canonical.shape[1], si.canonical.shape[0]  # rows = canonical y, cols = canonical x


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_slice_pixels_map_to_source_voxels_exactly(name, direction, spacing):
    """With no resize and no crop every model pixel is one voxel: check them all."""
    volume = make_volume(direction, spacing)
    probe = SliceInputs(volume, {"image_size": [1, 1], "in_chans": 1, "hu_window": WINDOW, "crop_body": False})
    rows, cols = canonical_slice_shape(probe)
    si = SliceInputs(volume, {"image_size": [rows, cols], "in_chans": 1, "hu_window": WINDOW, "crop_body": False})
    images = si.images(np.arange(si.n_slices))
    for s in range(si.n_slices):
        for r in range(rows):
            for c in range(cols):
                ijk = np.round(si.pixel_to_voxel(s, r, c)).astype(int)
                assert images[s, 0, r, c].item() == pytest.approx(windowed(volume.array[tuple(ijk)]), abs=1e-6)


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_slice_inverse_reproduces_input(name, direction, spacing):
    """An 'explainer' returning its input, written back, reproduces the windowed volume exactly."""
    volume = make_volume(direction, spacing)
    probe = SliceInputs(volume, {"image_size": [1, 1], "in_chans": 1, "hu_window": WINDOW, "crop_body": False})
    rows, cols = canonical_slice_shape(probe)
    si = SliceInputs(volume, {"image_size": [rows, cols], "in_chans": 1, "hu_window": WINDOW, "crop_body": False})
    images = torch.cat([batch.images for batch in si.batches(batch_size=4)])
    out = si.project(images[:, 0])
    assert out.transpose(2, 1, 0).flags.c_contiguous  # [X, Y, Z] view of a NIfTI-ordered buffer
    np.testing.assert_allclose(out, windowed(volume.array), atol=1e-6)
    k = si.n_slices // 2
    np.testing.assert_array_equal(
        si.canonical_slices(images[:, 0], [k])[:, :, 0], reoriented_view(out, si.ornt)[:, :, k]
    )


def test_slice_orientation_is_radiological():
    """Canonical slices show anterior at the top and the patient's right on the left, whatever the
    source axis order: a marker at a known LPS position lands at the expected model pixel."""
    for _, direction, spacing in GEOMETRIES[:3]:
        volume = make_volume(direction, spacing, shape=(9, 9, 9))
        volume.array[:] = -1000
        # a voxel on the anterior (−P) and right (−L) side of the centre, in world terms
        centre = volume.index_to_physical(np.array([4, 4, 4]))
        target = centre + np.array([-3 * max(spacing), -3 * max(spacing), 0])
        ijk = np.round(volume.physical_to_index(target)).astype(int)
        ijk = np.clip(ijk, 0, 8)
        volume.array[tuple(ijk)] = 400
        si = SliceInputs(volume, {"image_size": [9, 9], "in_chans": 1, "hu_window": WINDOW, "crop_body": False})
        images = si.images(np.arange(9))[:, 0]
        s, r, c = np.unravel_index(int(images.argmax()), images.shape)
        assert r < 4 and c < 4  # anterior → top rows, patient right → left columns


def test_slice_resize_and_crop_inverse_localises():
    """With body crop and a 2× resize a bright blob maps back to where it was."""
    shape = (64, 48, 5)
    array = np.full(shape, -1000.0, np.float32)
    array[8:56, 6:44, :] = 40.0  # body
    array[30:36, 20:26, 2] = 400.0  # blob
    volume = Volume(array, (0, 0, 0), (0.7, 0.7, 2.0), np.eye(3))
    si = SliceInputs(
        volume,
        {"image_size": [24, 24], "in_chans": 3, "hu_window": WINDOW, "crop_body": True, "body_threshold_hu": -500},
    )
    x0, x1, y0, y1 = si.box
    assert x0 <= 8 and x1 >= 56 and y0 <= 6 and y1 >= 44
    images = si.images([2])
    assert images.shape == (1, 3, 24, 24)
    maps = torch.zeros(si.n_slices, 24, 24)
    maps[2] = images[0, 0] ** 4
    out = si.project(maps)[None]
    peak = np.unravel_index(int(out[0].argmax()), shape)
    assert peak[2] == 2 and 29 <= peak[0] <= 36 and 19 <= peak[1] <= 26
    r, c = np.unravel_index(int(images[0, 0].argmax()), (24, 24))
    i, j, k = si.pixel_to_voxel(2, r, c)
    assert 29 <= i <= 36 and 19 <= j <= 26 and k == 2
    assert out[0][:, :, [0, 1, 3, 4]].max() == 0  # other slices untouched


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_roi_pixel_to_voxel(name, direction, spacing):
    """The centre pixel of every view of an ROI is the ROI centre; a bright voxel is found where it is."""
    volume = make_volume(direction, spacing, shape=(40, 40, 30))
    volume.array[:] = -1000
    ijk = np.array([20, 18, 14])
    volume.array[19:22, 17:20, 13:16] = 400
    centre = volume.index_to_physical(ijk)
    pre = {
        "image_size": [16, 16],
        "in_chans": 1,
        "hu_window": WINDOW,
        "roi": {"size_mm": 16.0, "spacing_mm": 1.0, "views": ["axial", "coronal", "sagittal"]},
    }
    roi = RoiInputs(volume, pre, centre[None])
    images = roi.images()
    assert images.shape == (3, 1, 16, 16)
    for v, view in enumerate(roi.views):
        r, c = np.unravel_index(int(images[v, 0].argmax()), (16, 16))
        found = roi.pixel_to_voxel(0, view, r, c)
        assert np.all(np.abs(found - ijk) <= 1.0 / np.asarray(spacing) + 1.01), (view, found)


def test_roi_inverse_writes_inside_cube_only():
    shape = (50, 50, 30)
    volume = Volume(np.full(shape, -1000.0, np.float32), (0, 0, 0), (1.0, 1.0, 2.0), np.eye(3))
    centre = volume.index_to_physical(np.array([25, 25, 15]))
    pre = {
        "image_size": [16, 16],
        "in_chans": 1,
        "hu_window": WINDOW,
        "roi": {"size_mm": 16.0, "spacing_mm": 1.0, "views": ["axial", "coronal", "sagittal"]},
    }
    roi = RoiInputs(volume, pre, centre[None])
    out = roi.project(torch.ones(3, 4, 4))[None]
    touched = np.argwhere(out[0] > 0)
    assert np.allclose(out[out > 0], 1.0)
    assert touched[:, 0].min() >= 25 - 9 and touched[:, 0].max() <= 25 + 9
    assert touched[:, 2].min() >= 15 - 5 and touched[:, 2].max() <= 15 + 5
    assert out[:, :5].max() == 0


def test_centers_from_mask():
    mask = Volume(np.zeros((20, 20, 10), np.int16), (1, 2, 3), (0.5, 0.5, 2.0), np.eye(3))
    mask.array[2:5, 2:5, 2:5] = 1
    mask.array[10:12, 10:14, 6:8] = 2
    centres, labels = centers_from_mask(mask)
    assert labels == [1, 2]
    np.testing.assert_allclose(centres[0], mask.index_to_physical(np.array([3, 3, 3])))
    np.testing.assert_allclose(centres[1], mask.index_to_physical(np.array([10.5, 11.5, 6.5])))


@pytest.mark.parametrize("size", [(24, 24), (7, 31), (5, 5)])
def test_window_and_resize_equal_monai_bit_for_bit(size):
    """The HU window and the resize are MONAI's ScaleIntensityRange(clip=True) and
    Resize(bilinear, align_corners=False, no anti-aliasing), run as plain torch ops."""
    from monai.transforms import Resize, ScaleIntensityRange

    rng = np.random.default_rng(3)
    planes = torch.from_numpy(rng.uniform(-1500, 1500, size=(6, 17, 13)).astype(np.float32))
    pre = {"hu_window": [-1000.0, 400.0], "scale_to": [-2.0, 2.0]}
    ours = window(pre)(planes)
    theirs = ScaleIntensityRange(a_min=-1000.0, a_max=400.0, b_min=-2.0, b_max=2.0, clip=True)(planes)
    np.testing.assert_array_equal(ours.numpy(), np.asarray(theirs))
    resized = resize_planes(ours, size)
    reference = Resize(spatial_size=size, mode="bilinear", align_corners=False, anti_aliasing=False)(theirs)
    np.testing.assert_array_equal(resized.numpy(), np.asarray(reference))


@pytest.mark.parametrize(
    "direction",
    [g[1] for g in GEOMETRIES] + [np.diag([1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0])],
    ids=[g[0] for g in GEOMETRIES] + ["flip-z", "flip-xy"],
)
def test_project_planes_equal_the_full_projection(direction):
    """A block of source planes (what a viewer shows) equals the same planes of the whole projection,
    whether the slicing axis is the source's third axis (the fast path) or not."""
    volume = make_volume(direction, (0.9, 1.1, 1.7), shape=(20, 18, 7))
    si = SliceInputs(volume, {"image_size": [8, 8], "in_chans": 1, "hu_window": WINDOW, "crop_body": True})
    maps = torch.randn(si.n_slices, 4, 4, generator=torch.Generator().manual_seed(1))
    full = si.project(maps)
    for z0, z1 in [(0, 7), (2, 5), (6, 7)]:
        np.testing.assert_array_equal(si.project_planes(maps, z0, z1), full[:, :, z0:z1])


def three_rois(direction, spacing, shape, seed):
    """Three 12 mm ROIs on a ``shape`` grid (two overlapping, one past the grid's edge) and random view maps."""
    volume = make_volume(direction, spacing, shape=shape)
    ijk = np.array([[0.5, 0.5, 0.33], [0.6, 0.55, 0.5], [0.1, 0.9, 0.92]]) * np.array(shape)
    pre = {
        "image_size": [16, 16],
        "in_chans": 1,
        "hu_window": WINDOW,
        "roi": {"size_mm": 12.0, "spacing_mm": 1.0, "views": ["axial", "coronal", "sagittal"]},
    }
    roi = RoiInputs(volume, pre, volume.index_to_physical(ijk))
    return roi, torch.randn(roi.n_inputs, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_display_values_are_what_the_projection_shows():
    """``display_values`` (a display window's values, without the source-grid buffer): every value the ROI
    projection writes is among them (overlapping cubes give each cube's own, so there may be more), and
    nothing from outside the cubes; slice inputs give the model-resolution maps themselves."""
    roi, maps = three_rois(np.eye(3), (1.5, 1.5, 2.0), (40, 36, 24), seed=4)
    full = roi.project(maps)
    shown = roi.display_values(maps)
    assert shown.ndim == 1 and len(shown) >= np.count_nonzero(full) > 0
    assert set(np.round(full[full != 0], 5)) <= set(np.round(shown, 5))
    pre = {"image_size": [8, 8], "in_chans": 1, "hu_window": WINDOW, "crop_body": False}
    slices = SliceInputs(make_volume(np.eye(3), (1.0, 1.0, 2.0), shape=(20, 20, 6)), pre)
    flat = torch.randn(slices.n_items, 4, 4)
    np.testing.assert_array_equal(slices.display_values(flat), flat.numpy())


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_roi_project_planes_equal_the_full_projection(name, direction, spacing):
    """A block of source planes of an ROI map (projected from the cubes that meet it only) equals the same
    planes of the whole projection, overlapping cubes and a cube past the grid's edge included."""
    roi, maps = three_rois(direction, spacing, (40, 36, 24), seed=2)
    full = roi.project(maps)
    assert np.count_nonzero(full) > 0
    for z0, z1 in [(0, 24), (0, 8), (6, 14), (20, 24), (23, 30)]:
        np.testing.assert_array_equal(roi.project_planes(maps, z0, z1), full[:, :, z0:z1])


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_roi_canonical_slices_equal_the_full_projection(name, direction, spacing):
    """Canonical slices of an ROI map, each projected from the cubes that meet it only, equal those slices of
    the whole projection reoriented, on every geometry (the canonical third axis from any source axis)."""
    roi, maps = three_rois(direction, spacing, (30, 26, 22), seed=3)
    full = reoriented_view(roi.project(maps), roi.ornt)
    slices = [0, 3, 7, 8, full.shape[2] - 1, -1]
    np.testing.assert_array_equal(roi.canonical_slices(maps, slices), full[:, :, slices])
    assert np.count_nonzero(full[:, :, slices]) > 0
    assert roi.canonical_slices(maps, []).shape == (*full.shape[:2], 0)
    with pytest.raises(IndexError):
        roi.canonical_slices(maps, [full.shape[2]])
