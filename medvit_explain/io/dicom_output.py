"""Explanation maps as DICOM Parametric Map objects (highdicom) that reference the source CT.

One Parametric Map Storage instance per method × target, each in a series of its own within the
source study: the raw signed map, one frame per source slice on the source grid, frame ``n`` at the
plane position of the ``n``-th source image (highdicom takes plane positions, orientation and pixel
spacing from the source images, and records the source instances in the per-frame derivation
references and in the Referenced Series Sequence). Two storage types, as for the NIfTI overlays:

* ``int16`` (default): 16-bit unsigned Pixel Data holding ``round(map / slope) + OFFSET`` (Parametric
  Maps allow only unsigned integers), with the Real World Value Mapping ``map = slope · stored −
  OFFSET · slope``; ``slope = max|map| / INT16_LEVELS`` as in :mod:`medvit_explain.io.nifti`, so the
  value a viewer shows is within half a step of the exact map. Half the size of float32.
* ``float32``: Float Pixel Data, the identity mapping (stored value = map value).

The mapping's unit is UCUM ``1`` (the map is unitless) and its label the method; a VOI window centred
at the stored value of 0 (± max|map|) gives viewers a diverging default display.

Only DICOM input has instances to reference: any other input raises ``MedvitInputError``.

UIDs are derived deterministically (``pydicom.uid.generate_uid`` with ``entropy_srcs``) from the
source series, the method, the target and the map's bytes: rerunning the same explanation gives the
same UIDs, a different map gets new ones.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from ..errors import MedvitInputError
from ..outputs.layout import dicom_map_name
from .nifti import INT16_LEVELS, int16_slope
from .writer import atomic_path

__all__ = ["DICOM_FORMATS", "METHOD_LABELS", "parametric_map", "write_dicom_maps"]

DICOM_FORMATS = ("dicom-series", "dicom")

# short display names (series descriptions, LUT labels ≤ 16 characters)
METHOD_LABELS = {
    "cdam": "CDAM",
    "cdam-smooth": "Smooth CDAM",
    "cdam-integrated": "Integrated CDAM",
    "agcam": "AG-CAM",
    "attention": "Attention",
    "rollout": "Rollout",
    "chefer": "Chefer",
    "gradcam": "Grad-CAM",
    "ig": "IG",
    "smoothgrad": "SmoothGrad",
    "inputxgrad": "InputXGrad",
}
OFFSET = INT16_LEVELS + 1  # stored value of a zero map value (int16 storage)
SERIES_NUMBER_BASE = 900  # output series are numbered 901, 902, … in method-major order


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _code_string(text: str, n: int = 16) -> str:
    """A DICOM CS value (upper case letters, digits, space, underscore; at most ``n`` characters)."""
    return re.sub(r"[^A-Z0-9_ ]", "_", text.upper())[:n]


def _software_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medvit-explain")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _read_sources(files: Sequence[str]) -> list[pydicom.Dataset]:
    sources = []
    for f in files:
        try:
            sources.append(pydicom.dcmread(f, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise MedvitInputError(f"cannot re-read the source DICOM file {f} to reference it: {exc}") from None
    return sources


def _sources_in_k_order(volume, sources: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The source images sorted so that image ``k`` holds voxel slice ``k`` of ``volume``.

    Matched by position: slice ``k`` of the volume sits at ``index_to_physical((0, 0, k))``; each
    single-frame source image's ``ImagePositionPatient`` must match one ``k`` within a tenth of the
    slice spacing. A single multi-frame source must hold one frame per slice (highdicom then takes
    the frame positions from its functional groups).
    """
    nz = volume.shape[2]
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        if int(sources[0].NumberOfFrames) != nz:
            raise MedvitInputError(
                f"the multi-frame source has {sources[0].NumberOfFrames} frames; expected one per slice ({nz})"
            )
        return sources
    if len(sources) != nz:
        raise MedvitInputError(f"expected one source DICOM image per slice ({nz}), got {len(sources)}")
    if nz == 1:
        return sources
    expected = volume.index_to_physical(np.stack([np.zeros(nz), np.zeros(nz), np.arange(nz)], axis=1))
    order = []
    tol = 0.1 * float(volume.spacing[2])
    positions = np.array([np.asarray(s.ImagePositionPatient, dtype=np.float64) for s in sources])  # [n, 3]
    distances = np.linalg.norm(expected[:, None, :] - positions[None, :, :], axis=2)  # [slice k, source]
    for k in range(nz):
        dist = distances[k]
        best = int(np.argmin(dist))
        if dist[best] > tol:
            raise MedvitInputError(
                f"no source DICOM image lies at slice {k}'s position {np.round(expected[k], 3).tolist()} "
                f"(nearest is {dist[best]:.3g} mm away); cannot reference the source instances"
            )
        order.append(best)
    if len(set(order)) != nz:
        raise MedvitInputError("several slices match the same source DICOM image; cannot reference the sources")
    return [sources[i] for i in order]


def stored_pixels(frames: np.ndarray, map_dtype: str = "int16") -> tuple[np.ndarray, float]:
    """The Pixel Data of a map ([n, rows, cols] float) and its real-world slope.

    ``int16``: ``uint16`` values ``round(map / slope) + OFFSET`` (quantised a block of frames at a time,
    in float64 against the float32 slope, so no full-size float64 copy is made); ``float32``: the map."""
    if map_dtype == "float32":
        return np.ascontiguousarray(frames, dtype=np.float32), 1.0
    if map_dtype != "int16":
        raise ValueError(f"expected map_dtype int16 or float32, got {map_dtype!r}")
    slope = int16_slope(frames)
    pixels = np.empty(frames.shape, np.uint16)
    for n in range(0, frames.shape[0], 16):
        block = np.asarray(frames[n : n + 16], dtype=np.float64)
        pixels[n : n + 16] = np.rint(block / slope) + OFFSET
    return pixels, slope


def parametric_map(
    sources: Sequence[pydicom.Dataset],
    frames: np.ndarray,
    *,
    method: str,
    target: str,
    series_uid: str,
    sop_uid: str,
    series_number: int,
    model_name: str = "medvit-explain",
    instance_number: int = 1,
    map_dtype: str = "int16",
):
    """A ``highdicom.pm.ParametricMap`` of ``frames`` ([n, rows, cols] float, frame ``n`` on
    ``sources[n]``) for one method and target, stored as ``map_dtype`` (``int16`` or ``float32``)."""
    pixels, slope = stored_pixels(frames, map_dtype)
    return _parametric_map(
        sources,
        pixels,
        slope,
        method=method,
        target=target,
        series_uid=series_uid,
        sop_uid=sop_uid,
        series_number=series_number,
        model_name=model_name,
        instance_number=instance_number,
    )


def _parametric_map(
    sources,
    pixels: np.ndarray,
    slope: float,
    *,
    method,
    target,
    series_uid,
    sop_uid,
    series_number,
    model_name,
    instance_number=1,
):
    import highdicom as hd

    label = _label(method)
    mapping_text = {
        "lut_label": label[:16],
        "lut_explanation": f"{label} {target} (raw signed attribution)"[:64],
        "unit": codes.UCUM.NoUnits,
    }
    if pixels.dtype == np.uint16:
        mapping = hd.pm.RealWorldValueMapping(
            value_range=(0, 2 * OFFSET), slope=slope, intercept=-OFFSET * slope, **mapping_text
        )
        centre, width = float(OFFSET), 2.0 * INT16_LEVELS
    else:
        lo, hi = float(np.nanmin(pixels)), float(np.nanmax(pixels))
        v = max(abs(lo), abs(hi)) or 1.0
        if hi <= lo:
            lo, hi = lo - 1.0, hi + 1.0
        mapping = hd.pm.RealWorldValueMapping(value_range=(lo, hi), slope=1.0, intercept=0.0, **mapping_text)
        centre, width = 0.0, 2.0 * v
    return hd.pm.ParametricMap(
        source_images=list(sources),
        pixel_array=pixels,
        series_instance_uid=series_uid,
        series_number=int(series_number),
        sop_instance_uid=sop_uid,
        instance_number=int(instance_number),
        manufacturer="medvit-explain",
        manufacturer_model_name=str(model_name)[:64] or "medvit-explain",
        software_versions=_software_version(),
        device_serial_number="0",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            hd.VOILUTTransformation(window_center=centre, window_width=width, window_explanation="symmetric about 0")
        ],
        content_label=_code_string(f"{method}_{target}"),
        content_description=f"{label} explanation map for {target}"[:64],
        series_description=f"{label} {target}"[:64],
    )


def dicom_sources(volume) -> list[pydicom.Dataset]:
    """The source DICOM headers the Parametric Maps of ``volume`` reference, in k order; raises
    ``MedvitInputError`` when maps cannot be written for this input (not DICOM, resampled on reading,
    files gone or not matching the slices). Cheap (headers only): ``explain --dicom`` calls it before
    computing anything, so a run that cannot write its DICOM output writes nothing at all."""
    meta = volume.metadata
    fmt = meta.get("format")
    if fmt not in DICOM_FORMATS:
        where = f" ({meta['path']})" if meta.get("path") else ""
        raise MedvitInputError(
            f"--dicom needs a DICOM input (a DICOM series folder or file) whose instances the maps can "
            f"reference; got a {fmt or 'non-DICOM'} input{where}. Drop --dicom or pass the DICOM series."
        )
    if meta.get("resampled"):
        raise MedvitInputError(
            f"--dicom cannot reference the source images: the series was resampled on reading ({meta['resampled']}), "
            "so no map slice lies on a source image; drop --dicom (the NIfTI overlays are on the resampled grid)"
        )
    files = meta.get("dicom_files") or []
    if not files:
        raise MedvitInputError("--dicom: the input's DICOM file list is missing; cannot reference the sources")
    return _sources_in_k_order(volume, _read_sources(files))


def write_dicom_maps(result, folder: str | os.PathLike, stem: str, map_dtype: str = "int16", workers: int = 1) -> Path:
    """Write one Parametric Map per method × target of ``result`` into ``folder``.

    Files are named ``<stem>_<method>_<target>_pm.dcm`` and written atomically (temporary name, then
    rename). Each is a new series in the source study referencing every source CT instance. Maps are
    projected, quantised and written ``workers`` at a time (each holds one map on the source grid).

    Args:
        result: an :class:`~medvit_explain.pipeline.ExplainResult` whose volume was read from DICOM.
        folder: output folder (created if needed).
        stem: file name prefix.
        map_dtype: ``int16`` (16-bit integers with a value mapping; default) or ``float32``.
        workers: maps written at once.

    Returns:
        ``folder``.

    Raises:
        MedvitInputError: the input was not DICOM, or its source files cannot be matched to the slices.
    """
    from concurrent.futures import ThreadPoolExecutor

    volume = result.volume
    meta = volume.metadata
    sources = dicom_sources(volume)
    source_series = str(getattr(sources[0], "SeriesInstanceUID", meta.get("series_uid", "")))
    model_name = (result.model_info or {}).get("name", "medvit-explain")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(m, t) for m in result.methods for t in result.targets]

    def write_one(n: int, method: str, target: str) -> None:
        frames = result.map_array(method, target).transpose(2, 1, 0)  # [Z, rows=j, cols=i], no copy
        pixels, slope = stored_pixels(frames, map_dtype)
        del frames  # only the stored pixels from here on
        digest = hashlib.sha256(pixels.data).hexdigest() + f"/{slope!r}"
        entropy = [source_series, method, target, digest]
        pm = _parametric_map(
            sources,
            pixels,
            slope,
            method=method,
            target=target,
            series_uid=generate_uid(entropy_srcs=[*entropy, "series"]),
            sop_uid=generate_uid(entropy_srcs=[*entropy, "sop"]),
            series_number=SERIES_NUMBER_BASE + n,
            model_name=model_name,
        )
        with atomic_path(folder / dicom_map_name(stem, method, target)) as tmp:
            pm.save_as(tmp, enforce_file_format=True)

    with ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="dicom") as pool:
        for future in [pool.submit(write_one, n, m, t) for n, (m, t) in enumerate(jobs, start=1)]:
            future.result()
    return folder
