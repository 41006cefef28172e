"""Volumes ↔ napari image layers with their world geometry (CT and overlays share one convention).

Convention: a layer's ``data`` is the volume's array seen as ``[Z, Y, X]`` (``array.transpose(2, 1, 0)``,
a view, no copy) and its ``affine`` is the volume's LPS affine with the three spatial axes reversed,
so napari's world axes are LPS millimetres in the order ``(z, y, x)``. Axis 0 (the slider in 2D) is
then the axial position for an axial scan, rows run towards posterior and columns towards the
patient's left: the radiological view. A world point maps to the same voxel in a CT layer and in an
overlay layer because both carry the same 4 × 4 affine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..viewer_logic import DEFAULT_OPACITY, color_range
from ..volume import Volume

# the reversal of the three spatial axes, in homogeneous coordinates
_REVERSE = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)

CT_CONTRAST_LIMITS = (-1000.0, 400.0)  # the model's HU window (lung to soft tissue)
OVERLAY_PERCENTILE = 99.5  # display window = ± this percentile of |map| (a few outliers ignored)
OVERLAY_BLENDINGS = ("translucent", "additive")


def napari_affine(affine_lps: np.ndarray) -> np.ndarray:
    """The 4 × 4 LPS affine of an ``[X, Y, Z]`` array → the affine of its ``[Z, Y, X]`` view (world (z, y, x))."""
    return _REVERSE @ np.asarray(affine_lps, dtype=np.float64) @ _REVERSE


def lps_affine(affine_napari: np.ndarray) -> np.ndarray:
    """Inverse of :func:`napari_affine` (the reversal is its own inverse)."""
    return napari_affine(affine_napari)


def layer_data(volume: Volume) -> np.ndarray:
    """The ``[Z, Y, X]`` view of the volume's array that napari displays."""
    return volume.array.transpose(2, 1, 0)


def diverging_colormap():
    """Blue (negative) → transparent (0) → red (positive): the CT stays visible where the map is ~0,
    with ``translucent`` blending (alpha) and with ``additive`` blending (near-black centre adds nothing)."""
    from napari.utils.colormaps import Colormap

    return Colormap(
        colors=[
            [0.10, 0.35, 1.00, 1.00],
            [0.35, 0.65, 1.00, 0.60],
            [0.00, 0.00, 0.00, 0.00],
            [1.00, 0.55, 0.20, 0.60],
            [1.00, 0.10, 0.05, 1.00],
        ],
        controls=[0.0, 0.25, 0.5, 0.75, 1.0],
        name="medvit diverging",
    )


def ct_layer_data(volume: Volume, name: str | None = None) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari ``LayerDataTuple`` for a CT: greyscale, the model's HU window, the file's geometry."""
    name = name or _name(volume)
    return (
        layer_data(volume),
        {
            "name": name,
            "affine": napari_affine(volume.affine_lps),
            "colormap": "gray",
            "contrast_limits": CT_CONTRAST_LIMITS,
            "metadata": {
                "medvit": {"kind": "ct", "path": volume.metadata.get("path"), "affine_lps": volume.affine_lps.tolist()}
            },
        },
        "image",
    )


def overlay_layer_data(
    volume: Volume,
    method: str,
    target: str,
    name: str | None = None,
    blending: str = "translucent",
    extra: Mapping[str, Any] | None = None,
    data: Any = None,
    window_values: Any = None,
) -> tuple[Any, dict[str, Any], str]:
    """A napari ``LayerDataTuple`` for a signed map: diverging colormap centred at 0 (window ± the
    99.5th percentile of |map|, or of ``window_values`` when given), ``translucent`` or ``additive``
    blending, the source's geometry. ``data`` replaces the ``[Z, Y, X]`` view of ``volume.array`` (a
    lazy array of the same shape, see :func:`lazy_overlay_layer_data`)."""
    if blending not in OVERLAY_BLENDINGS:
        raise ValueError(f"expected blending in {OVERLAY_BLENDINGS}, got {blending!r}")
    lo, hi = color_range(volume.array if window_values is None else window_values, percentile=OVERLAY_PERCENTILE)
    meta = {
        "kind": "overlay",
        "method": method,
        "target": target,
        "path": volume.metadata.get("path"),
        "affine_lps": volume.affine_lps.tolist(),
        **dict(extra or {}),
    }
    return (
        layer_data(volume) if data is None else data,
        {
            "name": name or f"{method}/{target}",
            "affine": napari_affine(volume.affine_lps),
            "colormap": diverging_colormap(),
            "contrast_limits": (lo, hi),
            "blending": blending,
            "opacity": DEFAULT_OPACITY,
            "rendering": "translucent",
            "metadata": {"medvit": meta},
        },
        "image",
    )


LAZY_PLANES = 8  # source planes computed together when napari shows one of them


def lazy_overlay_layer_data(result, method: str, target: str, name: str | None = None, blending: str = "translucent"):
    """:func:`overlay_layer_data` for one map of an :class:`~medvit_explain.pipeline.ExplainResult`,
    computed only where napari looks: the layer is a dask array whose blocks of ``LAZY_PLANES`` source
    planes are projected on demand (:meth:`ExplainResult.map_planes`), so 18 maps of a 512 × 512 × 300 CT
    cost what the shown planes cost instead of 5.7 GB. The window comes from the model-resolution map
    (the same values, before bilinear upsampling)."""
    import dask
    import dask.array as da

    shape = result.volume.shape  # [X, Y, Z]
    blocks = []
    for z0 in range(0, shape[2], LAZY_PLANES):
        z1 = min(shape[2], z0 + LAZY_PLANES)
        planes = dask.delayed(_planes_zyx)(result, method, target, z0, z1)
        blocks.append(da.from_delayed(planes, shape=(z1 - z0, shape[1], shape[0]), dtype=np.float32))
    data = da.concatenate(blocks, axis=0)
    window = result.model_map(method, target).float().cpu().numpy()
    return overlay_layer_data(
        result.volume, method, target, name=name, blending=blending, data=data, window_values=window
    )


def _planes_zyx(result, method: str, target: str, z0: int, z1: int) -> np.ndarray:
    return np.ascontiguousarray(result.map_planes(method, target, z0, z1).transpose(2, 1, 0))


def full_affine(layer) -> np.ndarray:
    """The layer's whole data → world map (its scale / translate / rotate / shear, then its affine)."""
    from napari.utils.transforms import Affine

    physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear)
    return np.asarray(layer.affine.affine_matrix) @ physical.affine_matrix


def volume_from_layer(layer) -> Volume:
    """A :class:`Volume` (``[X, Y, Z]``, LPS) from a 3D image layer that follows this module's convention."""
    data = np.asarray(layer.data)
    if data.ndim != 3 or getattr(layer, "rgb", False):
        raise ValueError(f"expected a 3D greyscale image layer, got {layer.name!r} with shape {data.shape}")
    affine = lps_affine(full_affine(layer))
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"layer {layer.name!r} has a degenerate affine (zero voxel size)")
    meta = dict((layer.metadata or {}).get("medvit", {}))
    path = meta.get("path") or (getattr(layer.source, "path", None)) or layer.name
    return Volume(
        data.transpose(2, 1, 0).astype(np.float32, copy=False),
        affine[:3, 3].copy(),
        spacing,
        linear / spacing,
        {"path": str(path), "format": "napari-layer", "modality": "CT"},
    )


def _name(volume: Volume) -> str:
    from ..viewer_logic import volume_stem

    return volume_stem(volume.metadata.get("path", "CT"))
