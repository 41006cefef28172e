"""Volumes ↔ napari layers with their world geometry (CT, label maps and overlays share one convention).

Convention: a layer's ``data`` is the volume's array seen as ``[Z, Y, X]`` (``array.transpose(2, 1, 0)``,
a view, no copy) and its ``affine`` is the volume's LPS affine with the three spatial axes reversed,
so napari's world axes are LPS millimetres in the order ``(z, y, x)``. A world point maps to the same
voxel in every layer of a study because each carries its own exact 4 × 4 affine.

Files are shown reoriented the way the CLI reorients them (:func:`reoriented_volume`): the voxel axes
are permuted and flipped (numpy views: nothing is resampled or copied) so they point towards patient
left, posterior and superior as closely as the grid allows (LPS axis codes, ``nibabel.orientations``,
:func:`medvit_explain.orientation.orientation_of` and ``reoriented_view``, as the CLI), and the affine
is rewritten for the new index order, so world positions do not move. Data axis 0, the slider in 2D,
is then the axial position whatever the acquisition (a sagittal or coronal scan shows axial slices, as
the model saw them), rows run towards posterior and columns towards the patient's left: the
radiological view. An oblique scan keeps its small residual rotation in the affine, so napari's world
positions stay exact (napari shows the slice of the nearest voxel axis, as the CLI explains it). The
reorientation is a function of the grid alone, so a CT and the label maps and overlays on its grid
get the same one; a layer the widget adds mirrors the CT layer it explained, whatever its layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..orientation import orientation_of, reoriented_view
from ..viewer_logic import DEFAULT_OPACITY, color_range
from ..volume import Volume

# the reversal of the three spatial axes, in homogeneous coordinates
_REVERSE = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)

CT_CONTRAST_LIMITS = (-1000.0, 400.0)  # the model's HU window (lung to soft tissue)
OVERLAY_PERCENTILE = 99.5  # display window = ± this percentile of |map| (a few outliers ignored)
OVERLAY_BLENDINGS = ("translucent", "additive")
LABELS_OPACITY = 0.5


def napari_affine(affine_lps: np.ndarray) -> np.ndarray:
    """The 4 × 4 LPS affine of an ``[X, Y, Z]`` array → the affine of its ``[Z, Y, X]`` view (world (z, y, x))."""
    return _REVERSE @ np.asarray(affine_lps, dtype=np.float64) @ _REVERSE


def lps_affine(affine_napari: np.ndarray) -> np.ndarray:
    """Inverse of :func:`napari_affine` (the reversal is its own inverse)."""
    return napari_affine(affine_napari)


def layer_data(volume: Volume) -> np.ndarray:
    """The ``[Z, Y, X]`` view of the volume's array that napari displays."""
    return volume.array.transpose(2, 1, 0)


# -- reorientation ------------------------------------------------------------------------------------
def reoriented_volume(volume: Volume) -> Volume:
    """The volume with its voxel axes permuted and flipped to LPS codes (see the module docstring).

    The array is :func:`medvit_explain.orientation.reoriented_view` of ``volume.array``; origin, spacing and
    direction describe the new index order, so ``index_to_physical`` of a voxel is unchanged (a volume
    already in LPS order keeps its array and grid). ``metadata["display_ornt"]`` records the ``ornt``.
    """
    import nibabel.orientations as nio

    ornt = orientation_of(volume)
    array = reoriented_view(volume.array, ornt)
    affine = volume.affine_lps @ nio.inv_ornt_aff(ornt, volume.shape)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    metadata = {**volume.metadata, "display_ornt": ornt.astype(int).tolist()}
    return Volume(array, affine[:3, 3].copy(), spacing, affine[:3, :3] / spacing, metadata)


# -- layer data tuples --------------------------------------------------------------------------------
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


def _meta(volume: Volume, kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "medvit": {
            "kind": kind,
            "path": volume.metadata.get("path"),
            "affine_lps": volume.affine_lps.tolist(),
            **({"display_ornt": volume.metadata["display_ornt"]} if "display_ornt" in volume.metadata else {}),
            **extra,
        }
    }


def ct_layer_data(
    volume: Volume, name: str | None = None, extra: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari ``LayerDataTuple`` for a CT: greyscale, the model's HU window, the volume's geometry."""
    return (
        layer_data(volume),
        {
            "name": name or _name(volume),
            "affine": napari_affine(volume.affine_lps),
            "colormap": "gray",
            "contrast_limits": CT_CONTRAST_LIMITS,
            "metadata": _meta(volume, "ct", **dict(extra or {})),
        },
        "image",
    )


def labels_layer_data(
    volume: Volume, name: str | None = None, extra: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, dict[str, Any], str]:
    """A napari ``LayerDataTuple`` for a label map (whole numbers ≥ 0, as ``_reader.label_values`` checks):
    a ``labels`` layer of the smallest unsigned integer type that holds them, the volume's geometry."""
    array = volume.array
    peak = float(array.max()) if array.size else 0.0
    dtype = np.uint8 if peak < 2**8 else np.uint16 if peak < 2**16 else np.uint32
    return (
        layer_data(volume).astype(dtype),
        {
            "name": name or _name(volume),
            "affine": napari_affine(volume.affine_lps),
            "opacity": LABELS_OPACITY,
            "metadata": _meta(volume, "labels", **dict(extra or {})),
        },
        "labels",
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
    99.5th percentile of |map|, or of ``window_values`` when given; of the non-zero values of a map that
    is mostly zero, as an ROI overlay outside its cubes), ``translucent`` or ``additive``
    blending, the volume's geometry. ``data`` replaces the ``[Z, Y, X]`` view of ``volume.array`` (a
    lazy array of the same shape, see :func:`lazy_overlay_layer_data`)."""
    if blending not in OVERLAY_BLENDINGS:
        raise ValueError(f"expected blending in {OVERLAY_BLENDINGS}, got {blending!r}")
    lo, hi = color_range(
        _window_values(volume.array if window_values is None else window_values), percentile=OVERLAY_PERCENTILE
    )
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
            "metadata": _meta(volume, "overlay", method=method, target=target, **dict(extra or {})),
        },
        "image",
    )


def _window_values(values) -> Any:
    """The values a map's window is taken from: all of them, or, for a map that is mostly exactly 0 (an ROI
    overlay, zero outside its cubes), its non-zero values, so the zeros outside do not squeeze the window."""
    values = np.asarray(values)
    nonzero = values[values != 0]
    return nonzero if 0 < nonzero.size < values.size / 2 else values


LAZY_PLANES = 8  # source planes computed together when napari shows one of them


def lazy_overlay_layer_data(result, method: str, target: str, name: str | None = None, blending: str = "translucent"):
    """:func:`overlay_layer_data` for one map of an :class:`~medvit_explain.pipeline.ExplainResult`,
    computed only where napari looks: the layer is a dask array whose blocks of ``LAZY_PLANES`` source
    planes are projected on demand (:meth:`ExplainResult.map_planes`), so 18 maps of a 512 × 512 × 300 CT
    cost what the shown planes cost instead of 5.7 GB. The window comes from the model-resolution map
    (the same values, before bilinear upsampling). The layout is ``result.volume``'s as it is (not
    reoriented): the volume came from the CT layer (:func:`volume_from_layer`), so the map lies on it. An
    ROI result's window is that of its projected map (the overlay file's: ``inputs.display_values``)."""
    import dask
    import dask.array as da

    shape = result.volume.shape  # [X, Y, Z]
    blocks = []
    for z0 in range(0, shape[2], LAZY_PLANES):
        z1 = min(shape[2], z0 + LAZY_PLANES)
        planes = dask.delayed(_planes_zyx)(result, method, target, z0, z1)
        blocks.append(da.from_delayed(planes, shape=(z1 - z0, shape[1], shape[0]), dtype=np.float32))
    data = da.concatenate(blocks, axis=0)
    # the window of what is shown, as the CLI's overlay file opened here gets, without projecting the map onto
    # the whole grid on the GUI thread (~1.4 s a map for a 512 x 512 x 300 CT with ROIs)
    window = result.inputs.display_values(result.model_map(method, target))
    return overlay_layer_data(
        result.volume, method, target, name=name, blending=blending, data=data, window_values=window
    )


def _planes_zyx(result, method: str, target: str, z0: int, z1: int) -> np.ndarray:
    return np.ascontiguousarray(result.map_planes(method, target, z0, z1).transpose(2, 1, 0))


def create_layer(layer_data_tuple: tuple):
    """A napari layer from a ``LayerDataTuple``; an overlay's colour bar is shown (``layer.colorbar``,
    napari ≥ 0.6.5; older versions have none and the layer comes without)."""
    from napari.layers import Layer

    layer = Layer.create(*layer_data_tuple)
    if layer_kind(layer) == "overlay" and hasattr(layer, "colorbar"):
        layer.colorbar.visible = True
    return layer


def layer_kind(layer) -> str | None:
    """``"ct"``, ``"labels"`` or ``"overlay"`` for a layer this plugin made, else None."""
    return (getattr(layer, "metadata", None) or {}).get("medvit", {}).get("kind")


# -- layers → volumes ---------------------------------------------------------------------------------
def full_affine(layer) -> np.ndarray:
    """The layer's whole data → world map (its scale / translate / rotate / shear, then its affine)."""
    from napari.utils.transforms import Affine

    physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear)
    return np.asarray(layer.affine.affine_matrix) @ physical.affine_matrix


def volume_from_layer(layer) -> Volume:
    """A :class:`Volume` (``[X, Y, Z]``, LPS) from a 3D image layer that follows this module's convention
    (its array is the layer's data as it is shown, reoriented or not)."""
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
