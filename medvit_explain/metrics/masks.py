"""Masks (nodules, lungs, body) brought to the model's input pixels, slice by slice.

A slice-mode model input is ``canonical[x0:x1, y0:y1, k].T`` (rows = canonical y, cols = x; see
:class:`medvit_explain.transforms.SliceInputs`) resized to the model image size. A mask follows the same
path with nearest-neighbour resizing (pixel centres, ``nearest-exact``), so mask pixel (r, c) is the
label of the source voxel the model pixel (r, c) was drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..transforms import RoiInputs, SliceInputs, _view_plane, reoriented_view

__all__ = ["body_mask", "roi_masks", "slice_masks"]


def slice_masks(mask: np.ndarray, inputs: SliceInputs, slices: Sequence[int] | np.ndarray) -> np.ndarray:
    """A source-grid mask ``[X, Y, Z]`` → its model-resolution slices ``[B, H, W]`` (same dtype).

    Args:
        mask: label array on the source grid of ``inputs.volume`` (instance ids, 0/1, ...).
        inputs: the slice preprocessing of the volume (orientation, crop box, image size).
        slices: canonical slice indices, as given to ``inputs.images``.
    """
    mask = np.asarray(mask)
    if mask.shape != tuple(inputs.volume.shape):
        raise ValueError(f"expected a mask of shape {tuple(inputs.volume.shape)}, got {mask.shape}")
    x0, x1, y0, y1 = inputs.box
    idx = np.asarray(slices, dtype=np.int64)
    canon = reoriented_view(mask, inputs.ornt)
    block = np.ascontiguousarray(canon[x0:x1, y0:y1][:, :, idx].transpose(2, 1, 0))  # [B, rows, cols]
    if block.shape[1:] == inputs.image_size or len(idx) == 0:
        return block if len(idx) else np.zeros((0, *inputs.image_size), mask.dtype)
    resized = F.interpolate(
        torch.from_numpy(block.astype(np.float32))[:, None], size=inputs.image_size, mode="nearest-exact"
    )[:, 0]
    return resized.numpy().astype(mask.dtype)


def roi_masks(mask: np.ndarray, inputs: RoiInputs, items: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """A source-grid label map ``[X, Y, Z]`` → its ROI views at model resolution ``[B, H, W]`` (same dtype).

    The same cube samples and planes as :meth:`RoiInputs.images` (item ``r * V + v`` is view ``v`` of ROI
    ``r``), sampled nearest-neighbour (labels are not averaged) with 0 outside the volume, then resized to
    the model's image size with pixel centres (``nearest-exact``): mask pixel (r, c) is the label of the
    source voxel nearest to where model pixel (r, c) was drawn from. A volumetric model's inputs
    (:class:`~medvit_explain.volumetric_inputs.CubeInputs`): the whole cube of each ROI, ``[B, D, H, W]``.
    """
    from scipy.ndimage import map_coordinates

    from ..volumetric_inputs import CUBE_VIEW, model_order

    mask = np.asarray(mask)
    if mask.shape != tuple(inputs.volume.shape):
        raise ValueError(f"expected a mask of shape {tuple(inputs.volume.shape)}, got {mask.shape}")
    items = np.arange(inputs.n_inputs) if items is None else np.asarray(items, dtype=np.int64)
    cubes: dict[int, np.ndarray] = {}
    planes = []
    for item in items:
        r, v = divmod(int(item), len(inputs.views))
        if r not in cubes:
            cubes[r] = map_coordinates(mask, inputs._cube_coords(r), order=0, mode="constant", cval=0)
        view = inputs.views[v]
        planes.append(np.ascontiguousarray(model_order(cubes[r]) if view == CUBE_VIEW else _view_plane(cubes[r], view)))
    if not planes:
        return np.zeros((0, *inputs.image_size), mask.dtype)
    block = np.stack(planes)
    if block.shape[1:] == tuple(inputs.image_size):
        return block.astype(mask.dtype)
    resized = F.interpolate(
        torch.from_numpy(block.astype(np.float32))[:, None], size=tuple(inputs.image_size), mode="nearest-exact"
    )[:, 0]
    return resized.numpy().astype(mask.dtype)


def body_mask(hu: np.ndarray, ornt: np.ndarray | None = None, threshold: float = -500.0) -> np.ndarray:
    """Voxels inside the body ``[X, Y, Z]`` bool: above ``threshold`` HU, with the holes of each axial
    plane filled (the lungs and airways are inside the body though darker than the threshold).

    ``ornt`` (from ``SliceInputs.ornt``) says which source axes are axial; without it the third axis is
    taken as the slice axis. The result is on the grid of ``hu``.
    """
    from scipy.ndimage import binary_fill_holes

    hu = np.asarray(hu)
    out = np.zeros(hu.shape, bool)
    canon_hu = reoriented_view(hu, ornt) if ornt is not None else hu
    canon_out = reoriented_view(out, ornt) if ornt is not None else out
    for k in range(canon_hu.shape[2]):
        canon_out[:, :, k] = binary_fill_holes(canon_hu[:, :, k] > threshold)
    return out
