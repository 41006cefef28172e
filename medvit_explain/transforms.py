"""Preprocessing: a :class:`~medvit_explain.volume.Volume` → model inputs, and model-space maps → the
source voxel grid.

Two input modes (DESIGN.md, "Input modes"):

* **slice** – the volume is reoriented to LPS axis codes (i → patient left, j → posterior,
  k → superior) so each k-slice is an axial image shown the radiological way (rows run anterior →
  posterior, columns patient right → left), optionally cropped to the body, HU-windowed and scaled to
  ``scale_to`` (default [0, 1]) and resized (bilinear) to the model input.
* **roi** – nodule-centred cubes (``size_mm`` at ``spacing_mm``, trilinear) on the reoriented axes,
  HU-windowed, cut through the centre in axial / coronal / sagittal views and resized.

Both modes then fill the ``in_chans`` channels by the ``channels`` recipe (:class:`ChannelRecipe`): copies
of the one plane (the default; windowed and resized once), one HU window per channel, or the neighbouring
planes k + offset (slice mode: canonical axial slices, only the slices a batch needs are read; ROI mode:
planes of the cube along the view's normal). Last, the optional per-channel ``mean`` / ``std``
normalisation: ``x_c = (x_c − mean[c]) / std[c]``. The order is window → resize → normalise.

The reorientation is a permutation and flips of the voxel axes (``nibabel.orientations``, the maths
MONAI's ``Orientation`` uses) applied as numpy *views*: nothing is resampled or copied, and writing a
map into the reoriented view of an output array writes the source grid directly, which is the exact
inverse. Every model pixel can be traced back to a continuous source voxel index
(:meth:`SliceInputs.pixel_to_voxel`, :meth:`RoiInputs.pixel_to_voxel`).

The HU window and the resize are MONAI's ``ScaleIntensityRange(clip=True)`` and
``Resize(mode="bilinear", align_corners=False, anti_aliasing=False)`` written as the torch operations
those transforms run (a test checks they agree bit for bit): ``import monai`` loads every MONAI
submodule and costs 5 s of every command's start on a laptop, for two lines of arithmetic.

Maps stay at the model's resolution while a volume is explained; :meth:`SliceInputs.project` and
:meth:`RoiInputs.project` put one map ([N, h, w], one target) on the source grid when it is needed,
with batched torch interpolation (on the maps' device) and one strided copy per chunk of slices. The
result is an ``[X, Y, Z]`` view of a ``[Z, Y, X]`` C-ordered buffer: the NIfTI voxel order, so a
writer streams it without another copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .orientation import CANONICAL_AXCODES, orientation_of, ornt_from_affine_ras, reoriented_view
from .volume import Volume

__all__ = ["CANONICAL_AXCODES", "orientation_of", "ornt_from_affine_ras", "reoriented_view"]  # re-exported


@dataclass(frozen=True)
class HUWindow:
    """HU window ``[lo, hi]`` scaled linearly onto ``[a, b]`` and clipped there (MONAI's
    ``ScaleIntensityRange(a_min=lo, a_max=hi, b_min=a, b_max=b, clip=True)``, same operations)."""

    lo: float
    hi: float
    a: float
    b: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.lo) / (self.hi - self.lo)
        x = x * (self.b - self.a) + self.a
        return torch.clamp(x, self.a, self.b)


@dataclass(frozen=True)
class RoiConfig:
    """ROI mode: a cube of ``size_mm`` sampled every ``spacing_mm`` around each centre, cut in ``views``."""

    size_mm: float = 32.0
    spacing_mm: float = 1.0
    views: tuple[str, ...] = ("axial", "coronal", "sagittal")


CHANNEL_RECIPES = ("copies", "hu_windows", "adjacent_slices")


@dataclass(frozen=True)
class ChannelRecipe:
    """What each model input channel holds: ``copies`` (the one plane in every channel), ``hu_windows``
    (channel c = the plane through ``windows[c]``, ``[lo, hi]`` HU, scaled to ``scale_to``) or
    ``adjacent_slices`` (channel c = the plane ``k + offsets[c]``, clamped to the volume / cube). With
    ``hu_windows`` the top-level ``hu_window`` is not used for the inputs."""

    recipe: str = "copies"
    windows: tuple[tuple[float, float], ...] = ()
    offsets: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.recipe not in CHANNEL_RECIPES:
            raise ValueError(f"expected a channel recipe among {CHANNEL_RECIPES}, got {self.recipe!r}")
        if self.recipe == "adjacent_slices" and 0 not in self.offsets:
            raise ValueError(f"expected adjacent_slices offsets that include 0, got {self.offsets}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | ChannelRecipe | None) -> ChannelRecipe:
        if isinstance(config, ChannelRecipe):
            return config
        if config is None or isinstance(config, str):
            return cls(config or "copies")
        return cls(
            str(config.get("recipe", "copies")),
            tuple((float(lo), float(hi)) for lo, hi in config.get("windows") or ()),
            tuple(int(o) for o in config.get("offsets") or ()),
        )

    def n_channels(self) -> int | None:
        """The channels the recipe itself fixes (None for copies: any number)."""
        return {"hu_windows": len(self.windows), "adjacent_slices": len(self.offsets)}.get(self.recipe)

    @property
    def centre(self) -> int:
        """The channel that holds the plane itself (``adjacent_slices``: offset 0; else the first): what a
        figure of the model's input shows."""
        return self.offsets.index(0) if self.recipe == "adjacent_slices" else 0


@dataclass(frozen=True)
class Preprocessing:
    """The model-input chain's settings, typed: built once from a checkpoint's ``preprocessing`` dict
    (validated and completed by :mod:`medvit_explain.model.preprocessing`) or a partial dict (the
    defaults below fill the rest), and read by both input modes.

    ``mean`` / ``std``: ``in_chans`` values each (a number in a dict is every channel's; one given alone
    makes the other the identity), or both None (no normalisation)."""

    image_size: tuple[int, ...]  # (H, W), or (D, H, W) for a volumetric model
    in_chans: int = 1
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    scale_to: tuple[float, float] = (0.0, 1.0)
    crop_body: bool = False
    body_threshold_hu: float = -500.0
    mode: str = "slice"
    roi: RoiConfig = RoiConfig()
    channels: ChannelRecipe = ChannelRecipe()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        n = self.channels.n_channels()
        if n is not None and n != self.in_chans:
            raise ValueError(f"recipe {self.channels.recipe} gives {n} channels, expected in_chans {self.in_chans}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("expected both mean and std, or neither")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != self.in_chans:
                raise ValueError(f"expected {self.in_chans} {name} values (in_chans), got {len(values)}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"expected std > 0, got {self.std}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Preprocessing) -> Preprocessing:
        if isinstance(config, Preprocessing):
            return config
        roi = dict(config.get("roi") or {})
        size = tuple(int(s) for s in config["image_size"])
        lo, hi = config.get("hu_window", cls.hu_window)
        a, b = config.get("scale_to", cls.scale_to)
        in_chans = int(config.get("in_chans") or cls.in_chans)
        mean, std = _normalisation_settings(config, in_chans)
        return cls(
            image_size=size,
            in_chans=in_chans,
            hu_window=(float(lo), float(hi)),
            scale_to=(float(a), float(b)),
            crop_body=bool(config.get("crop_body", cls.crop_body)),
            body_threshold_hu=float(config.get("body_threshold_hu", cls.body_threshold_hu)),
            mode=str(config.get("mode", cls.mode)),
            roi=RoiConfig(
                float(roi.get("size_mm", RoiConfig.size_mm)),
                float(roi.get("spacing_mm", RoiConfig.spacing_mm)),
                tuple(roi.get("views", RoiConfig.views)),
            ),
            channels=ChannelRecipe.from_config(config.get("channels")),
            mean=mean,
            std=std,
        )

    def channel_windows(self) -> tuple[HUWindow, ...]:
        """The window of each channel (``in_chans`` of them): the recipe's windows, else ``hu_window``."""
        a, b = self.scale_to
        if self.channels.recipe == "hu_windows":
            return tuple(HUWindow(lo, hi, a, b) for lo, hi in self.channels.windows)
        return (HUWindow(*self.hu_window, a, b),) * self.in_chans


def _normalisation_settings(
    config: Mapping[str, Any] | Preprocessing, in_chans: int
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` as ``in_chans``-tuples (numbers broadcast, a missing one the identity) or ``(None, None)``."""
    if isinstance(config, Preprocessing):
        return config.mean, config.std
    mean, std = config.get("mean"), config.get("std")
    if mean is None and std is None:
        return None, None

    def per_channel(value, identity: float) -> tuple[float, ...]:
        if value is None:
            return (identity,) * in_chans
        if isinstance(value, (int, float)):
            return (float(value),) * in_chans
        return tuple(float(v) for v in value)

    return per_channel(mean, 0.0), per_channel(std, 1.0)


def window(preprocessing: Mapping[str, Any] | Preprocessing) -> HUWindow:
    """HU clamp to ``hu_window`` and linear scaling to ``scale_to`` (default [0, 1])."""
    return HUWindow(*_window_settings(preprocessing))


def _window_settings(preprocessing: Mapping[str, Any] | Preprocessing) -> tuple[float, float, float, float]:
    if isinstance(preprocessing, Preprocessing):
        return (*preprocessing.hu_window, *preprocessing.scale_to)
    lo, hi = preprocessing.get("hu_window", Preprocessing.hu_window)
    a, b = preprocessing.get("scale_to", Preprocessing.scale_to)
    return float(lo), float(hi), float(a), float(b)


def resize_planes(planes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[N, h, w] → [N, *size], bilinear, ``align_corners=False``, no anti-aliasing (MONAI ``Resize``
    with those settings on a channel-first [N, h, w] image: each plane resized on its own)."""
    if tuple(planes.shape[-2:]) == tuple(size):
        return planes
    return F.interpolate(planes[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


def resize_volumes(volumes: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """[N, d, h, w] → [N, *size], trilinear, ``align_corners=False``, no anti-aliasing (MONAI ``Resize``
    with those settings, ``mode="trilinear"``, on a channel-first [N, d, h, w] volume)."""
    if tuple(volumes.shape[-3:]) == tuple(size):
        return volumes
    return F.interpolate(volumes[None], size=tuple(size), mode="trilinear", align_corners=False)[0]


def resize_images(images: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """[N, *spatial] → [N, *size]: :func:`resize_planes` (2D) or :func:`resize_volumes` (3D)."""
    return resize_volumes(images, size) if len(size) == 3 else resize_planes(images, size)


def new_source_buffer(shape: tuple[int, int, int]) -> np.ndarray:
    """A zero float32 map on a grid of ``shape`` [X, Y, Z], stored as a C-ordered [Z, Y, X] buffer
    (the NIfTI voxel order); the [X, Y, Z] view is returned."""
    return np.zeros(tuple(shape)[::-1], np.float32).transpose(2, 1, 0)


PROJECT_CHUNK = 32  # slices interpolated per step: bounds the float32 temporaries of a projection


def channel_fill(preprocessing: Mapping[str, Any] | Preprocessing, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[C]: the model-input value of each channel's window centre, after ``mean`` / ``std`` (what a
    'removed' pixel of that channel is set to). Every window is scaled onto ``scale_to``, so the centre
    is ``(a + b) / 2`` before the normalisation; ``C`` = ``in_chans`` (1 when a dict does not say)."""
    _, _, a, b = _window_settings(preprocessing)
    if isinstance(preprocessing, Preprocessing):
        n = preprocessing.in_chans
    else:
        n = int(preprocessing.get("in_chans") or Preprocessing.in_chans)
    centre = torch.full((n,), (a + b) / 2.0, dtype=torch.float64)
    mean, std = _normalisation_settings(preprocessing, n)
    if mean is not None:
        centre = (centre - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    return centre.to(dtype)


def window_mean(preprocessing: Mapping[str, Any] | Preprocessing) -> float:
    """The model-input value of the window's centre (what a 'removed' pixel is set to), when it is the
    same in every channel; raises ``ValueError`` when ``mean`` / ``std`` make it differ per channel (use
    :func:`channel_fill`, one value per channel, then)."""
    _, _, a, b = _window_settings(preprocessing)
    if _normalisation_settings(preprocessing, 1) == (None, None):
        return (a + b) / 2.0  # the unnormalised value, exactly as before
    values = channel_fill(preprocessing, torch.float64)
    if not bool((values == values[0]).all()):
        raise ValueError(f"the window's centre differs per channel ({values.tolist()}); use channel_fill")
    return float(values[0])


def channel_images(config: Preprocessing, hu: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Model inputs [B, C, H, W] (float32) from HU planes ``hu`` [N, h, w] by ``config``'s channel recipe:
    :func:`window_channels` → :func:`resize_planes` → :func:`pick_channels` → :func:`normalise_channels`
    (the same four steps :mod:`medvit_explain.monai_transforms` runs as MONAI transforms). A volumetric
    model's ``config`` (``image_size`` (D, H, W)) takes HU volumes [N, d, h, w] and gives [B, C, D, H, W].

    ``index`` [B, C] (``adjacent_slices``): channel c of input b is plane ``index[b, c]``; each plane is
    windowed and resized once, however many inputs use it. Otherwise N = B."""
    planes = window_channels(config, hu)  # [N, C0, h, w]
    n, c0 = planes.shape[:2]
    planes = resize_images(planes.flatten(0, 1), config.image_size).unflatten(0, (n, c0))
    if config.channels.recipe != "hu_windows":
        planes = pick_channels(config, planes[:, 0], index)
    return normalise_channels(config, planes)


def window_channels(config: Preprocessing, hu: torch.Tensor) -> torch.Tensor:
    """HU planes [N, h, w] → windowed [N, C0, h, w]: one window per channel for ``hu_windows`` (C0 =
    ``in_chans``), else the one ``hu_window`` (C0 = 1); each scaled onto ``scale_to``."""
    if config.channels.recipe == "hu_windows":
        return torch.stack([w(hu) for w in config.channel_windows()], 1)
    return window(config)(hu)[:, None]


def pick_channels(config: Preprocessing, planes: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Windowed, resized planes [N, H, W] → [B, C, H, W]: channel c of input b is plane ``index[b, c]``
    (``adjacent_slices``), or every channel the plane itself (``copies``; N = B). Contiguous: the GPU
    batch loop pins every batch, and that path has only seen dense tensors."""
    if index is not None:
        return planes[index]
    return planes[:, None].expand(-1, config.in_chans, *planes.shape[1:]).contiguous()


def normalise_channels(config: Preprocessing, images: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → ``(x_c − mean[c]) / std[c]`` (unchanged when the preprocessing has no mean / std)."""
    return _normalise(images, config.mean, config.std)


def _normalise(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """``x_c = (x_c - mean[c]) / std[c]`` on [B, C, H, W] (nothing when ``mean`` / ``std`` are None)."""
    if mean is None or std is None:
        return images
    shape = (-1, *([1] * (images.ndim - 2)))  # per channel, over every spatial axis
    m = torch.tensor(mean, dtype=images.dtype).reshape(shape)
    s = torch.tensor(std, dtype=images.dtype).reshape(shape)
    return (images - m) / s


@dataclass
class InputBatch:
    """A batch of model inputs: ``images`` [B, C, H, W] and the item index of each (a canonical slice in
    slice mode, an ROI view ``r * V + v`` in ROI mode)."""

    images: torch.Tensor
    items: np.ndarray  # [B]


class ModelInputs:
    """What every input mode offers (one interface for slices and ROIs):

    * ``mode`` (``"slice"`` / ``"roi"``), ``n_items``, ``item_columns`` (the table's per-item columns);
    * ``batches(batch_size)`` → :class:`InputBatch` in item order, ``images(items)``;
    * ``item_rows(items)`` → one dict of ``item_columns`` per item (where it came from);
    * the inverse: ``project(maps [n_items, h, w])`` → the map on the source grid, ``canonical_slices``,
      ``project_planes``; ``ornt`` (the reorientation to LPS axis codes).
    """

    mode: str = ""
    item_columns: tuple[str, ...] = ()

    @property
    def n_items(self) -> int:
        raise NotImplementedError

    def images(self, items: Sequence[int] | np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def batches(self, batch_size: int, items: Sequence[int] | None = None) -> Iterator[InputBatch]:
        """Model inputs ``batch_size`` items at a time (all items in order by default)."""
        order = np.arange(self.n_items) if items is None else np.asarray(items, dtype=np.int64)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield InputBatch(self.images(chunk), chunk)

    def display_values(self, maps: torch.Tensor) -> np.ndarray:
        """The values a display window of one map (``maps``, model resolution, as :meth:`project` takes it)
        is taken from, without projecting it onto the source grid: here the maps' own values (the bilinear
        upsampling to the source grid stays within them); ROI inputs override it."""
        return maps.float().cpu().numpy()

    @property
    def slicing_axis(self) -> int:
        """The source voxel axis that becomes the canonical third (slicing) axis, k."""
        return int(np.argsort(self.ornt[:, 0])[2])

    def canonical_to_source_k(self, slices: np.ndarray) -> np.ndarray:
        """Source voxel index along the axis that became canonical k, for each slice."""
        axis_for_k = self.slicing_axis
        n = self.volume.shape[axis_for_k]
        return np.where(self.ornt[axis_for_k, 1] == -1, n - 1 - slices, slices)

    def project_planes(self, maps: torch.Tensor, z0: int, z1: int) -> np.ndarray:
        """Source voxel planes ``z0:z1`` (along the source's third axis) of the projected map: [X, Y, n].

        When that axis is the canonical third one (an axial acquisition) only the matching canonical slices are
        computed (``canonical_slices``), so a viewer can show one plane at the cost of one slice; otherwise the
        whole map is projected and cut. Slice and volume modes share this; ROI mode has its own."""
        if self.slicing_axis != 2:
            return np.ascontiguousarray(self.project(maps)[:, :, z0:z1])
        out = np.zeros((*self.volume.shape[:2], z1 - z0), np.float32)
        view = reoriented_view(out, self.ornt)  # [Xc, Yc, n]: canonical in-plane axes (the block flipped too)
        j = np.arange(z1 - z0)
        source_z = z0 + (z1 - z0 - 1 - j if self.ornt[2, 1] == -1 else j)  # the source plane view[:, :, j] is
        view[...] = self.canonical_slices(maps, self.canonical_to_source_k(source_z))  # source z <-> canonical k
        return out


@dataclass
class SliceInputs(ModelInputs):
    """Slice-mode preprocessing of one volume, streamed in batches, and its exact inverse."""

    mode = "slice"
    item_columns = ("slice", "source_index", "z_mm")

    volume: Volume
    preprocessing: Mapping[str, Any] | Preprocessing
    ornt: np.ndarray = field(init=False)
    box: tuple[int, int, int, int] = field(init=False)  # x0, x1, y0, y1 in canonical axes

    def __post_init__(self) -> None:
        self.config = Preprocessing.from_config(self.preprocessing)
        self.ornt = orientation_of(self.volume)
        canon = reoriented_view(self.volume.array, self.ornt)
        nx, ny, _ = canon.shape
        self.box = (0, nx, 0, ny)
        if self.config.crop_body:
            self.box = body_box(canon, self.config.body_threshold_hu, aspect=self.image_size[0] / self.image_size[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_size

    @property
    def in_chans(self) -> int:
        return self.config.in_chans

    @property
    def canonical(self) -> np.ndarray:
        return reoriented_view(self.volume.array, self.ornt)

    @property
    def n_slices(self) -> int:
        return self.canonical.shape[2]

    @property
    def crop_shape(self) -> tuple[int, int]:
        """(rows, cols) of a cropped slice before resizing: rows run along canonical y, cols along x."""
        x0, x1, y0, y1 = self.box
        return y1 - y0, x1 - x0

    def images(self, slices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Model inputs [B, C, H, W] (float32) for canonical slice indices ``slices``.

        ``adjacent_slices``: channel c of slice k is slice ``clamp(k + offsets[c], 0, n_slices - 1)``; only
        the slices the batch needs (the union of those) are read."""
        idx = np.asarray(slices, dtype=np.int64)
        if self.config.channels.recipe != "adjacent_slices":
            return channel_images(self.config, self._hu_planes(idx))
        wanted = np.clip(idx[:, None] + np.asarray(self.config.channels.offsets), 0, self.n_slices - 1)  # [B, C]
        needed = np.unique(wanted)
        index = torch.from_numpy(np.searchsorted(needed, wanted))  # [B, C] -> row of ``needed``
        return channel_images(self.config, self._hu_planes(needed), index)

    def _hu_planes(self, idx: np.ndarray) -> torch.Tensor:
        """[len(idx), Y', X'] float32 HU of canonical slices ``idx``, cropped (a copy of just these slices)."""
        x0, x1, y0, y1 = self.box
        block = self.canonical[x0:x1, y0:y1][:, :, idx]  # [X', Y', N]
        return torch.from_numpy(np.ascontiguousarray(block.transpose(2, 1, 0), dtype=np.float32))

    @property
    def n_items(self) -> int:
        return self.n_slices

    def item_rows(self, items: Sequence[int] | np.ndarray) -> list[dict]:
        """``slice`` (canonical), ``source_index`` (along the source axis that became k) and ``z_mm`` (of the
        slice's centre pixel) for each item."""
        slices = np.asarray(items, dtype=np.int64)
        centre = ((self.image_size[0] - 1) / 2, (self.image_size[1] - 1) / 2)
        rows = []
        for s, k in zip(slices, self.canonical_to_source_k(slices)):
            z_mm = float(self.volume.index_to_physical(self.pixel_to_voxel(int(s), *centre))[2])
            rows.append({"slice": int(s), "source_index": int(k), "z_mm": round(z_mm, 4)})
        return rows

    def crop_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """[N, h, w] maps (token grid or model input size) → [N, rows, cols] on the cropped slice:
        bilinear to the model input size, then bilinear to the crop (the inverse of the resize)."""
        maps = maps.detach().float()
        maps = resize_planes(maps, self.image_size)
        return resize_planes(maps, self.crop_shape)

    def canonical_slices(self, maps: torch.Tensor, slices: Sequence[int]) -> np.ndarray:
        """Canonical slices ``slices`` ([X, Y, len(slices)] float32, zeros outside the crop) of the map
        whose model-space maps are ``maps`` ([n_slices, h, w]); only those slices are interpolated."""
        x0, x1, y0, y1 = self.box
        nx, ny, _ = self.canonical.shape
        out = np.zeros((nx, ny, len(slices)), np.float32)
        out[x0:x1, y0:y1] = self.crop_maps(maps[list(slices)]).cpu().numpy().transpose(2, 1, 0)
        return out

    def project(self, maps: torch.Tensor) -> np.ndarray:
        """One map on the source grid: [n_slices, h, w] (every canonical slice, in order) → [X, Y, Z]
        float32 (a view of a [Z, Y, X] buffer), zeros outside the crop box."""
        if maps.shape[0] != self.n_slices:
            raise ValueError(f"expected maps for all {self.n_slices} slices, got {maps.shape[0]}")
        out = new_source_buffer(self.volume.shape)
        canon = reoriented_view(out, self.ornt)
        x0, x1, y0, y1 = self.box
        for k in range(0, self.n_slices, PROJECT_CHUNK):
            crop = self.crop_maps(maps[k : k + PROJECT_CHUNK]).cpu().numpy()  # [n, rows, cols]
            canon[x0:x1, y0:y1, k : k + PROJECT_CHUNK] = crop.transpose(2, 1, 0)
        return out

    def pixel_to_voxel(self, slice_index: int, row: float, col: float) -> np.ndarray:
        """The continuous source voxel index (i, j, k) of model pixel (row, col) of a canonical slice."""
        rows, cols = self.crop_shape
        h, w = self.image_size
        y = (row + 0.5) * rows / h - 0.5 + self.box[2]
        x = (col + 0.5) * cols / w - 0.5 + self.box[0]
        return canonical_to_source_index(np.array([x, y, float(slice_index)]), self.ornt, self.volume.shape)


def canonical_to_source_index(canon_ijk: np.ndarray, ornt: np.ndarray, source_shape) -> np.ndarray:
    """Map a canonical (reoriented) continuous index back to the source voxel index."""
    src = np.zeros(3)
    for axis in range(3):
        target_axis, flip = int(ornt[axis, 0]), int(ornt[axis, 1])
        value = canon_ijk[target_axis]
        src[axis] = (source_shape[axis] - 1 - value) if flip == -1 else value
    return src


def body_box(canon: np.ndarray, threshold: float, aspect: float = 1.0, margin: int = 2) -> tuple[int, int, int, int]:
    """Bounding box (x0, x1, y0, y1) of voxels above ``threshold`` over all slices, grown to the
    model's aspect ratio (rows / cols) where the image allows, so the body is not distorted."""
    nx, ny = canon.shape[:2]
    step = max(1, canon.shape[2] // 32)  # a subset of slices is enough to find the body
    mask = (canon[:, :, ::step] > threshold).any(axis=2)
    if not mask.any():
        return 0, nx, 0, ny
    xs, ys = np.where(mask.any(axis=1))[0], np.where(mask.any(axis=0))[0]
    x0, x1 = max(0, xs[0] - margin), min(nx, xs[-1] + 1 + margin)
    y0, y1 = max(0, ys[0] - margin), min(ny, ys[-1] + 1 + margin)
    # grow the shorter side (rows = y, cols = x) towards the wanted aspect ratio
    want_rows = int(round((x1 - x0) * aspect))
    if want_rows > y1 - y0:
        y0, y1 = _grow(y0, y1, want_rows, ny)
    else:
        want_cols = int(round((y1 - y0) / aspect))
        x0, x1 = _grow(x0, x1, want_cols, nx)
    return int(x0), int(x1), int(y0), int(y1)


def _grow(lo: int, hi: int, want: int, n: int) -> tuple[int, int]:
    want = min(want, n)
    extra = want - (hi - lo)
    lo = max(0, lo - extra // 2)
    hi = min(n, lo + want)
    lo = max(0, hi - want)
    return lo, hi


VIEW_NORMAL_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # canonical axis each view cuts across


def display_plane_at(canonical: np.ndarray, view: str, index: int) -> np.ndarray:
    """The [rows, cols] plane ``index`` along ``view``'s normal of a canonical (L, P, S) ``[x, y, z]`` array,
    displayed the usual way: axial rows anterior→posterior, cols patient right→left; coronal rows
    superior→inferior, cols right→left; sagittal rows superior→inferior, cols anterior→posterior. A view."""
    if view == "axial":
        return canonical[:, :, index].T
    if view == "coronal":
        return canonical[:, index, ::-1].T
    if view == "sagittal":
        return canonical[index, :, ::-1].T
    raise ValueError(f"expected a view among {sorted(VIEW_NORMAL_AXIS)}, got {view!r}")


def _view_plane(cube: np.ndarray, view: str, offset: int = 0) -> np.ndarray:
    """A [rows, cols] image through the centre of a canonical (L, P, S) cube (:func:`display_plane_at`).
    ``offset``: the plane that many samples from the centre along the view's normal (+ = towards
    superior / posterior / left), clamped to the cube."""
    c = min(max(cube.shape[0] // 2 + offset, 0), cube.shape[0] - 1)
    return display_plane_at(cube, view, c)


def _extrude(plane: np.ndarray, view: str, n: int) -> np.ndarray:
    """The inverse of :func:`_view_plane` for a [..., rows, cols] map: repeat it along the view normal."""
    if view == "axial":
        vol = np.swapaxes(plane, -1, -2)[..., :, :, None]  # [..., x, y, 1]
    elif view == "coronal":
        vol = np.swapaxes(plane, -1, -2)[..., :, ::-1][..., :, None, :]  # [..., x, 1, z]
    else:
        vol = np.swapaxes(plane, -1, -2)[..., :, ::-1][..., None, :, :]  # [..., 1, y, z]
    return np.broadcast_to(vol, (*plane.shape[:-2], n, n, n))


@dataclass
class RoiInputs(ModelInputs):
    """ROI-mode preprocessing: a cube of ``size_mm`` at ``spacing_mm`` around each centre (LPS mm),
    cut in the configured views, and the inverse that writes view maps back onto the source grid.

    Model inputs are ordered ROI-major: input ``r * V + v`` is view ``v`` of ROI ``r``. ``labels``: the
    mask label of each ROI (default 1 … R)."""

    mode = "roi"
    item_columns = ("roi", "label", "view", "center_x_mm", "center_y_mm", "center_z_mm")

    volume: Volume
    preprocessing: Mapping[str, Any] | Preprocessing
    centers_mm: np.ndarray  # [R, 3] LPS mm
    labels: list[int] | None = None
    ornt: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.centers_mm = np.asarray(self.centers_mm, dtype=np.float64).reshape(-1, 3)
        self.labels = list(range(1, len(self.centers_mm) + 1)) if self.labels is None else list(self.labels)
        self.ornt = orientation_of(self.volume)
        self.config = Preprocessing.from_config(self.preprocessing)
        self.size_mm, self.spacing_mm = self.config.roi.size_mm, self.config.roi.spacing_mm
        self.views = list(self.config.roi.views)
        self.n = max(2, int(round(self.size_mm / self.spacing_mm)))
        self.image_size, self.in_chans = self.config.image_size, self.config.in_chans
        # canonical index step (voxels per cube sample) along each canonical axis
        src_axis_of = np.argsort(self.ornt[:, 0])  # canonical axis -> source axis
        self._step = self.spacing_mm / self.volume.spacing[src_axis_of]
        self._canon_shape = tuple(self.volume.shape[int(a)] for a in src_axis_of)

    @property
    def n_inputs(self) -> int:
        return len(self.centers_mm) * len(self.views)

    @property
    def n_items(self) -> int:
        return self.n_inputs

    def item_rows(self, items: Sequence[int] | np.ndarray) -> list[dict]:
        """``roi``, its mask ``label``, the ``view`` and the ROI centre (LPS mm) for each item."""
        rows = []
        for item in np.asarray(items, dtype=np.int64):
            r, v = divmod(int(item), len(self.views))
            x, y, z = (float(c) for c in self.centers_mm[r])
            rows.append({"roi": r, "label": int(self.labels[r]), "view": self.views[v]})
            rows[-1].update(center_x_mm=x, center_y_mm=y, center_z_mm=z)
        return rows

    def _center_canonical(self, r: int) -> np.ndarray:
        src = self.volume.physical_to_index(self.centers_mm[r])
        return source_to_canonical_index(src, self.ornt, self.volume.shape)

    def _cube_coords(self, r: int) -> np.ndarray:
        """[3, n, n, n] source voxel indices of the cube samples of ROI ``r``."""
        t = np.arange(self.n) - (self.n - 1) / 2.0
        centre = self._center_canonical(r)
        axes = [centre[a] + t * self._step[a] for a in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"))  # canonical [3, n, n, n]
        src = np.empty_like(grid)
        for axis in range(3):
            target, flip = int(self.ornt[axis, 0]), int(self.ornt[axis, 1])
            src[axis] = (self.volume.shape[axis] - 1 - grid[target]) if flip == -1 else grid[target]
        return src

    def cube(self, r: int) -> np.ndarray:
        """The HU cube [n, n, n] of ROI ``r`` on canonical axes (trilinear; edge values outside)."""
        from scipy.ndimage import map_coordinates

        return map_coordinates(self.volume.array, self._cube_coords(r), order=1, mode="nearest").astype(np.float32)

    def images(self, items: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """Model inputs [len(items), C, H, W] (all R·V by default), each ROI's cube sampled once."""
        items = np.arange(self.n_inputs) if items is None else np.asarray(items, dtype=np.int64)
        recipe = self.config.channels
        offsets = recipe.offsets if recipe.recipe == "adjacent_slices" else (0,)  # cube planes per input
        cubes: dict[int, np.ndarray] = {}
        planes = []
        for item in items:
            r, v = divmod(int(item), len(self.views))
            if r not in cubes:
                cubes[r] = self.cube(r)
            planes += [np.ascontiguousarray(_view_plane(cubes[r], self.views[v], o)) for o in offsets]
        if not planes:
            return torch.zeros((0, self.in_chans, *self.image_size))
        hu = torch.from_numpy(np.stack(planes))  # [B · len(offsets), n, n]
        index = torch.arange(len(hu)).reshape(len(items), -1) if recipe.recipe == "adjacent_slices" else None
        return channel_images(self.config, hu, index)

    def cube_maps(self, maps: torch.Tensor) -> np.ndarray:
        """[R·V, h, w] view maps (one target) → [R, n, n, n] cube maps (each view extruded along its
        normal, then averaged over views)."""
        maps = resize_planes(resize_planes(maps.detach().float(), self.image_size), (self.n, self.n))
        R, V = len(self.centers_mm), len(self.views)
        maps = maps.cpu().numpy().reshape(R, V, self.n, self.n)
        cubes = np.zeros((R, self.n, self.n, self.n), np.float32)
        for v, view in enumerate(self.views):
            cubes += _extrude(maps[:, v], view, self.n)
        return cubes / V

    def project(self, maps: torch.Tensor) -> np.ndarray:
        """One map on the source grid: [R·V, h, w] view maps → [X, Y, Z] float32 (a view of a [Z, Y, X]
        buffer), trilinear from each ROI's cube map inside its cube, zero outside every cube."""
        out = new_source_buffer(self.volume.shape)
        return self._source_planes(self._view_cubes(maps), 2, 0, self.volume.shape[2], out)

    def display_values(self, maps: torch.Tensor) -> np.ndarray:
        """The values :meth:`project` writes inside the ROI cubes (1-D float32; where cubes overlap, each
        cube's own), without the source-grid buffer. ROI maps are zero outside their cubes and averaged over
        the views inside, so the model-resolution maps' values would give too wide a window."""
        parts = [values[inside] for _, inside, values in self._cube_regions(self._view_cubes(maps))]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def _view_cubes(self, maps: torch.Tensor) -> np.ndarray:
        """:meth:`cube_maps` of one map's view maps, which must cover every ROI view."""
        if maps.shape[0] != self.n_inputs:
            raise ValueError(f"expected maps for all {self.n_inputs} ROI views, got {maps.shape[0]}")
        return self.cube_maps(maps)

    def _cube_regions(self, cubes: np.ndarray, axis: int = 2, start: int = 0, stop: int | None = None):
        """Per ROI whose cube meets the source grid (its planes ``start:stop`` along source voxel axis
        ``axis``; all by default): ``(region, inside, values)``, the source-voxel box around the cube within
        those planes, which of its voxels lie in the cube, and the cube map (``cubes[r]``, canonical
        [n, n, n]) trilinear at each voxel."""
        from scipy.ndimage import map_coordinates

        bounds_lo, bounds_hi = np.zeros(3, int), np.array(self.volume.shape)
        bounds_lo[axis] = max(0, start)
        bounds_hi[axis] = bounds_hi[axis] if stop is None else min(stop, bounds_hi[axis])
        for r in range(len(self.centers_mm)):
            corners = self._cube_coords(r)[:, [0, -1]][:, :, [0, -1]][:, :, :, [0, -1]].reshape(3, -1)
            lo = np.maximum(np.floor(corners.min(axis=1)).astype(int), bounds_lo)
            hi = np.minimum(np.ceil(corners.max(axis=1)).astype(int) + 1, bounds_hi)
            if np.any(hi <= lo):
                continue
            idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"))
            canon = source_to_canonical_index(idx.reshape(3, -1).T, self.ornt, self.volume.shape).T
            coords = (canon - self._center_canonical(r)[:, None]) / self._step[:, None] + (self.n - 1) / 2.0
            inside = np.all((coords >= -0.5) & (coords <= self.n - 0.5), axis=0).reshape(idx.shape[1:])
            region = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
            values = map_coordinates(cubes[r], coords, order=1, mode="nearest").reshape(idx.shape[1:])
            yield region, inside, values

    def canonical_slices(self, maps: torch.Tensor, slices: Sequence[int]) -> np.ndarray:
        """Canonical slices ``slices`` ([X, Y, len(slices)]) of the projected map, each from the cubes that
        meet it only (the source plane it is, along the source axis that becomes the canonical third)."""
        cubes = self._view_cubes(maps)
        axis = self.slicing_axis
        depth = self.volume.shape[axis]
        planes = [np.zeros((*self._canon_shape[:2], 0), np.float32)]
        for k in slices:
            if not -depth <= k < depth:
                raise IndexError(f"slice {k} is out of range for {depth} slices")
            source = int(self.canonical_to_source_k(np.asarray(int(k) % depth)))
            plane = self._source_planes(cubes, axis, source, 1)
            planes.append(reoriented_view(plane, self.ornt))
        return np.ascontiguousarray(np.concatenate(planes, axis=2))

    def project_planes(self, maps: torch.Tensor, z0: int, z1: int) -> np.ndarray:
        """Source voxel planes ``z0:z1`` of the projected map ([X, Y, n] float32): only the cubes that
        meet those planes, only there (what a viewer asks for, a block at a time)."""
        z0, z1 = max(0, z0), min(z1, self.volume.shape[2])
        return self._source_planes(self._view_cubes(maps), 2, z0, z1 - z0)

    def _source_planes(
        self, cubes: np.ndarray, axis: int, start: int, count: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The projected map's source planes ``start:start + count`` along voxel axis ``axis``, written from
        the cube maps ``cubes`` that meet them into ``out`` (zeros; by default a new source grid with that
        axis cut to ``count``)."""
        if out is None:
            shape = list(self.volume.shape)
            shape[axis] = max(0, count)
            out = np.zeros(shape, np.float32)
        for region, inside, values in self._cube_regions(cubes, axis, start, start + count):
            region = list(region)
            region[axis] = slice(region[axis].start - start, region[axis].stop - start)
            out[tuple(region)] = np.where(inside, values, out[tuple(region)])
        return out

    def pixel_to_voxel(self, roi: int, view: str, row: float, col: float) -> np.ndarray:
        """The continuous source voxel index of model pixel (row, col) of a view of ROI ``roi``."""
        h, w = self.image_size
        pr = (row + 0.5) * self.n / h - 0.5  # plane coordinates
        pc = (col + 0.5) * self.n / w - 0.5
        c = self.n // 2
        if view == "axial":
            cube_xyz = (pc, pr, c)
        elif view == "coronal":
            cube_xyz = (pc, c, self.n - 1 - pr)
        else:
            cube_xyz = (c, pc, self.n - 1 - pr)
        canon = self._center_canonical(roi) + (np.asarray(cube_xyz) - (self.n - 1) / 2.0) * self._step
        return canonical_to_source_index(canon, self.ornt, self.volume.shape)


def source_to_canonical_index(src_ijk: np.ndarray, ornt: np.ndarray, source_shape) -> np.ndarray:
    """Map source continuous indices [..., 3] to canonical (reoriented) indices [..., 3]."""
    src_ijk = np.asarray(src_ijk, dtype=np.float64)
    out = np.empty_like(src_ijk)
    for axis in range(3):
        target, flip = int(ornt[axis, 0]), int(ornt[axis, 1])
        value = src_ijk[..., axis]
        out[..., target] = (source_shape[axis] - 1 - value) if flip == -1 else value
    return out


def centers_from_mask(mask: Volume) -> tuple[np.ndarray, list[int]]:
    """Centroids (LPS mm, [R, 3]) of each label > 0 of an instance mask, and the labels.

    One pass over the labelled voxels only (a 512 × 512 × 300 mask: 0.2 s, where ``np.unique`` over
    every voxel and a full-size weight array for ``center_of_mass`` took 6 s and 300 MB)."""
    where = np.nonzero(mask.array > 0)
    values = mask.array[where].astype(np.int64)
    labels = [int(v) for v in np.unique(values)]
    if not labels:
        return np.zeros((0, 3)), []
    counts = np.bincount(values)[labels]
    ijk = np.stack([np.bincount(values, weights=axis)[labels] / counts for axis in where], axis=1)
    return mask.index_to_physical(ijk), labels
