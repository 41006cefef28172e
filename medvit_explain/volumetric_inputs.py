"""Model inputs for volumetric ViTs (``image_size`` (D, H, W)) and their exact inverses onto the source grid.

Two modes, behind the same :class:`~medvit_explain.transforms.ModelInputs` interface as the 2D ones:

* **roi** (:class:`CubeInputs`): each nodule's cube (``roi.size_mm`` at ``roi.spacing_mm`` around its
  centre, trilinear, on the LPS-reoriented axes -- exactly the cube the 2D ROI mode cuts its views from)
  is one input ``[C, D, H, W]``, HU-windowed and resized (trilinear) to the model's box. One item per
  ROI; the table keeps the 2D ROI layout with the one view ``"3d"`` (and its ``mean`` row).
* **volume** (:class:`VolumeInputs`): the whole CT, reoriented, optionally cropped to the body in the
  axial plane, HU-windowed and resized (trilinear, aspect not kept) to the model's box. One item.

Axis order of a model input, for both: ``D`` runs inferior → superior (canonical k), ``H`` anterior →
posterior (canonical j), ``W`` patient right → left (canonical i): each ``[d]`` plane is an axial image
shown the radiological way, as in slice mode.

The inverse of a map ``[gd, gh, gw]``: trilinear to the model's box, then trilinear to the cube / the
cropped volume (both ``align_corners=False``, the inverse of the resize), then the cube is sampled at
every source voxel inside it (its physical position → a continuous cube index; oblique and anisotropic
grids included) and the cropped volume is written through the reorientation view. Zero elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .orientation import orientation_of, reoriented_view
from .transforms import (
    PROJECT_CHUNK,
    ModelInputs,
    Preprocessing,
    RoiInputs,
    body_box,
    canonical_to_source_index,
    channel_images,
    new_source_buffer,
    normalise_channels,
    pick_channels,
    resize_planes,
    resize_volumes,
    window_channels,
)
from .volume import Volume

CUBE_VIEW = "3d"  # the one "view" of a volumetric ROI input, in the predictions table


def model_order(canonical: np.ndarray) -> np.ndarray:
    """A canonical ``[x, y, z]`` block → the model's ``[D, H, W]`` = ``[z, y, x]`` order (a view)."""
    return canonical.transpose(2, 1, 0)


def cube_images(config: Preprocessing, cubes: Sequence[np.ndarray]) -> torch.Tensor:
    """Model inputs [B, C, D, H, W] from HU cubes [n, n, n] on canonical axes: each in the model's axis order,
    then the channel chain (window, trilinear resize, channels, normalisation)."""
    hu = np.stack([np.ascontiguousarray(model_order(c)) for c in cubes])
    return channel_images(config, torch.from_numpy(hu))


@dataclass
class CubeInputs(RoiInputs):
    """ROI mode for a volumetric model: input ``r`` is ROI ``r``'s whole cube ``[C, D, H, W]``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.views = [CUBE_VIEW]

    def images(self, items: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Model inputs [len(items), C, D, H, W] (float32; all ROIs by default)."""
        items = np.arange(self.n_inputs) if items is None else np.asarray(items, dtype=np.int64)
        if len(items) == 0:
            return torch.zeros((0, self.in_chans, *self.image_size))
        return cube_images(self.config, [self.cube(int(r)) for r in items])

    def cube_maps(self, maps: torch.Tensor) -> np.ndarray:
        """[R, gd, gh, gw] maps (one target) → [R, n, n, n] cube maps on canonical axes."""
        maps = resize_volumes(resize_volumes(maps.detach().float(), self.image_size), (self.n,) * 3)
        return np.ascontiguousarray(maps.cpu().numpy().transpose(0, 3, 2, 1))

    def voxel_to_source(self, roi: int, d: float, row: float, col: float) -> np.ndarray:
        """The continuous source voxel index of model voxel (d, row, col) of ROI ``roi``'s input."""
        cube = [(v + 0.5) * self.n / s - 0.5 for v, s in zip((col, row, d), self.image_size[::-1])]
        canon = self._center_canonical(roi) + (np.asarray(cube) - (self.n - 1) / 2.0) * self._step
        return canonical_to_source_index(canon, self.ornt, self.volume.shape)


@dataclass
class VolumeInputs(ModelInputs):
    """Volume mode: the whole CT as one input [C, D, H, W], and the inverse of that resample."""

    mode = "volume"
    item_columns = ("volume",)

    volume: Volume
    preprocessing: Any
    ornt: np.ndarray = field(init=False)
    box: tuple[int, int, int, int] = field(init=False)  # x0, x1, y0, y1 in canonical axes

    def __post_init__(self) -> None:
        self.config = Preprocessing.from_config(self.preprocessing)
        self.ornt = orientation_of(self.volume)
        self.image_size, self.in_chans = self.config.image_size, self.config.in_chans
        canon = self.canonical
        self.box = (0, canon.shape[0], 0, canon.shape[1])
        if self.config.crop_body:
            _, h, w = self.image_size
            self.box = body_box(canon, self.config.body_threshold_hu, aspect=h / w)

    @property
    def canonical(self) -> np.ndarray:
        return reoriented_view(self.volume.array, self.ornt)

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        """(slices, rows, cols) of the cropped canonical volume before resizing."""
        x0, x1, y0, y1 = self.box
        return self.canonical.shape[2], y1 - y0, x1 - x0

    @property
    def n_items(self) -> int:
        return 1

    def images(self, items: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """The model input [1, C, D, H, W] (float32) for item 0."""
        items = [0] if items is None else list(np.asarray(items, dtype=np.int64))
        if any(i != 0 for i in items):
            raise IndexError(f"volume mode has one item (0), got {items}")
        if not items:
            return torch.zeros((0, self.in_chans, *self.image_size))
        return self._whole_input().expand(len(items), -1, -1, -1, -1)

    def _whole_input(self) -> torch.Tensor:
        """[1, C, D, H, W]: window → trilinear resize → channels → normalisation, as ``channel_images`` does,
        with the resize done separably (bilinear in each axial plane, then linear along D: the same
        arithmetic) over chunks of slices, so a 512 × 512 × 300 CT never exists in float32 more than a chunk
        at a time."""
        x0, x1, y0, y1 = self.box
        canon = self.canonical
        depth, h, w = self.image_size
        planes = []
        for k in range(0, canon.shape[2], PROJECT_CHUNK):
            block = np.ascontiguousarray(model_order(canon[x0:x1, y0:y1, k : k + PROJECT_CHUNK]), dtype=np.float32)
            windowed = window_channels(self.config, torch.from_numpy(block))  # [n, C0, rows, cols]
            n, c0 = windowed.shape[:2]
            planes.append(resize_planes(windowed.flatten(0, 1), (h, w)).unflatten(0, (n, c0)))
        stack = torch.cat(planes).permute(1, 2, 3, 0)  # [C0, H, W, Z]
        c0 = stack.shape[0]
        along_z = F.interpolate(stack.reshape(1, c0 * h * w, -1), size=depth, mode="linear", align_corners=False)
        volume = along_z.reshape(c0, h, w, depth).permute(0, 3, 1, 2)[None]  # [1, C0, D, H, W]
        if self.config.channels.recipe != "hu_windows":
            volume = pick_channels(self.config, volume[:, 0])
        return normalise_channels(self.config, volume.contiguous())

    def item_rows(self, items: Sequence[int] | np.ndarray) -> list[dict]:
        return [{"volume": int(i)} for i in np.asarray(items, dtype=np.int64)]

    def _model_box_map(self, maps: torch.Tensor) -> torch.Tensor:
        if maps.shape[0] != 1:
            raise ValueError(f"expected the one volume's map [1, gd, gh, gw], got {tuple(maps.shape)}")
        return resize_volumes(maps.detach().float(), self.image_size)[0]  # [D, H, W]

    def _crop_slices(self, box_map: torch.Tensor, slices: np.ndarray) -> np.ndarray:
        """Canonical slices ``slices`` of the cropped volume's map, [len, rows, cols]: the trilinear resize
        (``align_corners=False``) from the model box, done separably -- linear along D at the box's in-plane
        size, then bilinear in-plane -- so only the slices asked for are interpolated and each exists at full
        size once."""
        n_slices, rows, cols = self.crop_shape
        depth = box_map.shape[0]
        src = np.maximum((np.asarray(slices, dtype=np.float64) + 0.5) * depth / n_slices - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), depth - 1)
        hi = np.minimum(lo + 1, depth - 1)
        device = box_map.device  # the maps may still be on the GPU
        w = torch.from_numpy((src - lo).astype(np.float32)).to(device)[:, None, None]
        lo_t, hi_t = torch.from_numpy(lo).to(device), torch.from_numpy(hi).to(device)
        planes = (1 - w) * box_map[lo_t] + w * box_map[hi_t]  # [len, H, W]
        return resize_planes(planes, (rows, cols)).cpu().numpy()

    def canonical_slices(self, maps: torch.Tensor, slices: Sequence[int]) -> np.ndarray:
        """Canonical slices ``slices`` ([X, Y, len(slices)] float32, zeros outside the crop) of the map."""
        x0, x1, y0, y1 = self.box
        nx, ny, _ = self.canonical.shape
        out = np.zeros((nx, ny, len(slices)), np.float32)
        if len(slices):
            out[x0:x1, y0:y1] = self._crop_slices(self._model_box_map(maps), np.asarray(slices)).transpose(2, 1, 0)
        return out

    def project(self, maps: torch.Tensor) -> np.ndarray:
        """The map [1, gd, gh, gw] on the source grid: [X, Y, Z] float32 (a view of a [Z, Y, X] buffer)."""
        box_map = self._model_box_map(maps)
        out = new_source_buffer(self.volume.shape)
        canon = reoriented_view(out, self.ornt)
        x0, x1, y0, y1 = self.box
        n_slices = self.crop_shape[0]
        for k in range(0, n_slices, PROJECT_CHUNK):
            ks = np.arange(k, min(k + PROJECT_CHUNK, n_slices))
            canon[x0:x1, y0:y1, k : k + len(ks)] = self._crop_slices(box_map, ks).transpose(2, 1, 0)
        return out

    def voxel_to_source(self, d: float, row: float, col: float) -> np.ndarray:
        """The continuous source voxel index of model voxel (d, row, col)."""
        n_slices, rows, cols = self.crop_shape
        depth, h, w = self.image_size
        z = (d + 0.5) * n_slices / depth - 0.5
        y = (row + 0.5) * rows / h - 0.5 + self.box[2]
        x = (col + 0.5) * cols / w - 0.5 + self.box[0]
        return canonical_to_source_index(np.array([x, y, z]), self.ornt, self.volume.shape)
