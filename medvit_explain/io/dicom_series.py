"""Write a ``Volume`` as a CT Image Storage DICOM series (one file per k-slice), with pydicom.

Geometry (DICOM is LPS, like ``Volume``): the pixel array of slice ``k`` is ``array[:, :, k].T``
(DICOM rows run along j, columns along i), so

* ``ImageOrientationPatient`` = ``direction[:, 0]`` (row direction: along i, from one column to the
  next) followed by ``direction[:, 1]`` (column direction: along j);
* ``PixelSpacing`` = ``[spacing[1], spacing[0]]`` (row spacing, column spacing);
* ``ImagePositionPatient`` = ``volume.index_to_physical((0, 0, k))``.

DICOM has no slot for the k axis: readers take the slice normal ``cross(row, col)`` and sort the files
by position along it. A volume whose k axis is ``-cross(row, col)`` is still written from its real
geometry; a reader then returns the same voxels in reversed k order (same physical positions).
A k axis that is not parallel to the normal (sheared grid) cannot be stored as a series and is refused.

Values are stored as int16 with ``RescaleSlope`` / ``RescaleIntercept``: integer HU in
``[-31744, 31743]`` round-trip exactly (slope 1, intercept -1024); other values are rounded to the
nearest stored step.

UIDs are deterministic by default: they are derived (``pydicom.uid.generate_uid`` with
``entropy_srcs``) from ``uid_seed`` or, when it is not given, from a hash of the voxels, the geometry
and the descriptive attributes, so writing the same volume twice gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from ..errors import UnsupportedImageError
from ..volume import Volume

__all__ = ["write_ct_series", "write_ct_file", "ct_slice_dataset", "series_uids", "rescale_for"]

_INT16_MIN, _INT16_MAX = -32768, 32767


def _fmt(value: float) -> str:
    """A DICOM DS string (at most 16 characters) that round-trips ``value`` as well as DS allows."""
    value = float(value)
    if abs(value) < 1e-12:
        return "0"
    for digits in range(15, 0, -1):
        s = f"{value:.{digits}g}"
        if "e" in s:
            mant, exp = s.split("e")
            s = f"{mant}e{int(exp)}"
        if len(s) <= 16:
            return s
    raise AssertionError(f"cannot format {value} as DS")  # pragma: no cover


def series_uids(
    uid_seed: str | int | None,
    volume: Volume | None = None,
    *,
    uid_prefix: str | None = None,
    extra: Sequence[str] = (),
) -> dict[str, str]:
    """Deterministic ``study`` / ``series`` / ``frame_of_reference`` UIDs and a ``base`` string.

    ``uid_seed`` (any string or int) fixes them; when it is ``None`` they are derived from a SHA-256
    of ``volume``'s voxels and geometry plus ``extra``. ``uid_prefix`` is passed to
    ``generate_uid`` (``None`` uses pydicom's root).
    """
    if uid_seed is None:
        if volume is None:
            raise ValueError("expected uid_seed or a volume to derive UIDs from, got neither")
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(volume.array).tobytes())
        for a in (volume.origin, volume.spacing, volume.direction):
            h.update(np.asarray(a, dtype=np.float64).tobytes())
        for s in extra:
            h.update(str(s).encode())
        base = "content:" + h.hexdigest()
    else:
        base = f"seed:{uid_seed}"
    prefix = uid_prefix if uid_prefix is not None else pydicom.uid.PYDICOM_ROOT_UID
    return {
        "base": base,
        "prefix": prefix,
        "study": generate_uid(prefix, entropy_srcs=[base, "study"]),
        "series": generate_uid(prefix, entropy_srcs=[base, "series"]),
        "frame_of_reference": generate_uid(prefix, entropy_srcs=[base, "frame_of_reference"]),
    }


def rescale_for(array: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` for int16 storage of ``array`` (HU).

    Slope 1 / intercept -1024 when the range fits (integer HU then round-trip exactly), else slope 1 /
    intercept 0, else a slope that spreads the range over the int16 span (lossy).
    """
    lo, hi = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise UnsupportedImageError(f"expected finite voxel values, got a range [{lo}, {hi}]")
    for intercept in (-1024.0, 0.0):
        if round(lo) - intercept >= _INT16_MIN and round(hi) - intercept <= _INT16_MAX:
            return 1.0, intercept
    slope = (hi - lo) / float(_INT16_MAX - _INT16_MIN)
    intercept = lo - _INT16_MIN * slope
    return slope, intercept


def _check_geometry(volume: Volume) -> np.ndarray:
    """Return the unit slice normal ``cross(row, col)``; refuse geometry DICOM cannot carry."""
    if volume.array.ndim != 3:
        raise UnsupportedImageError(f"expected a 3D [X, Y, Z] array, got shape {volume.array.shape}")
    d = volume.direction
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise UnsupportedImageError(f"expected orthonormal direction cosines for a DICOM series, got {d.tolist()}")
    if np.any(volume.spacing <= 0):
        raise UnsupportedImageError(f"expected positive spacing, got {volume.spacing.tolist()}")
    normal = np.cross(d[:, 0], d[:, 1])
    if abs(abs(float(normal @ d[:, 2])) - 1.0) > 1e-4:  # pragma: no cover - orthonormal implies this
        raise UnsupportedImageError("expected the k axis parallel to the slice normal")
    return normal


def ct_slice_dataset(
    volume: Volume,
    k: int,
    *,
    uids: dict[str, str],
    rescale: tuple[float, float],
    series_description: str = "medvit-explain CT",
    patient_id: str = "PHANTOM",
    patient_name: str = "Phantom^Synthetic",
    study_description: str = "",
    series_number: int = 1,
    study_date: str = "",
    study_time: str = "",
    window: tuple[float, float] = (40.0, 400.0),
) -> Dataset:
    """The pydicom ``Dataset`` (with file meta) of slice ``k`` of ``volume`` as a CT image."""
    normal = _check_geometry(volume)
    stored = _stored_slice(volume, k, rescale)
    sop_uid = generate_uid(uids["prefix"], entropy_srcs=[uids["base"], "sop", str(k)])
    ds = Dataset()
    ds.file_meta = _file_meta(sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.StudyTime = study_time
    ds.SeriesTime = study_time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "medvit-explain"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _fmt(volume.spacing[2])
    ds.SpacingBetweenSlices = _fmt(volume.spacing[2])
    ds.KVP = ""
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = ""
    ds.SeriesNumber = int(series_number)
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = int(k) + 1
    ds.FrameOfReferenceUID = uids["frame_of_reference"]
    _set_image_plane_and_pixels(ds, volume, k, normal, stored, rescale, window)
    return ds


def _stored_slice(volume: Volume, k: int, rescale: tuple[float, float]) -> np.ndarray:
    """Slice ``k`` as stored int16 values ([rows = j, cols = i]) under ``rescale`` (slope, intercept)."""
    slope, intercept = rescale
    hu = np.asarray(volume.array[:, :, k], dtype=np.float64).T
    stored = np.rint((hu - intercept) / slope)
    if stored.min() < _INT16_MIN or stored.max() > _INT16_MAX:
        raise UnsupportedImageError("voxel values do not fit int16 storage with the given rescale")
    return stored.astype("<i2")


def _file_meta(sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDVIT_EXPLAIN"
    return meta


def _set_image_plane_and_pixels(ds, volume, k, normal, stored, rescale, window) -> None:
    """The Image Plane and Image Pixel modules of slice ``k``, with the CT's rescale and window."""
    nx, ny, _ = volume.shape
    slope, intercept = rescale
    position = volume.index_to_physical(np.array([0.0, 0.0, float(k)]))
    ds.ImagePositionPatient = [_fmt(v) for v in position]
    d = volume.direction
    ds.ImageOrientationPatient = [_fmt(v) for v in (*d[:, 0], *d[:, 1])]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _fmt(float(position @ normal))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(ny)
    ds.Columns = int(nx)
    ds.PixelSpacing = [_fmt(volume.spacing[1]), _fmt(volume.spacing[0])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = _fmt(window[0])
    ds.WindowWidth = _fmt(window[1])
    ds.RescaleIntercept = _fmt(intercept)
    ds.RescaleSlope = _fmt(slope)
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()


def _save(ds: Dataset, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_ct_series(
    volume: Volume,
    folder: str | os.PathLike,
    *,
    series_description: str = "medvit-explain CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    uid_seed: str | int | None = None,
    uid_prefix: str | None = None,
    patient_id: str = "PHANTOM",
    patient_name: str = "Phantom^Synthetic",
    study_description: str = "",
    series_number: int = 1,
    window: tuple[float, float] = (40.0, 400.0),
    filename_pattern: str = "IM{index:05d}.dcm",
) -> list[Path]:
    """Write ``volume`` as a CT series into ``folder`` (created if needed), one file per k-slice.

    Args:
        volume: the CT; ``array`` ``[X, Y, Z]`` in HU, LPS geometry with orthonormal direction.
        folder: output directory. Existing files with the same names are replaced (each file is
            written to a temporary name first, so no partial file sits at a final name).
        study_uid / series_uid / frame_of_reference_uid: explicit UIDs; the ones not given are
            derived deterministically from ``uid_seed`` (or from the content, see ``series_uids``).
        uid_prefix: root for generated UIDs (``None``: pydicom's).
        window: ``(WindowCenter, WindowWidth)``.
        filename_pattern: ``str.format`` pattern with ``index`` (1-based slice number).

    Returns:
        The written paths in k order.
    """
    _check_geometry(volume)
    uids = series_uids(
        uid_seed,
        volume,
        uid_prefix=uid_prefix,
        extra=(series_description, patient_id, patient_name, study_description, str(series_number)),
    )
    if study_uid is not None:
        uids["study"] = study_uid
    if series_uid is not None:
        uids["series"] = series_uid
    if frame_of_reference_uid is not None:
        uids["frame_of_reference"] = frame_of_reference_uid
    rescale = rescale_for(volume.array)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(volume.shape[2]):
        ds = ct_slice_dataset(
            volume,
            k,
            uids=uids,
            rescale=rescale,
            series_description=series_description,
            patient_id=patient_id,
            patient_name=patient_name,
            study_description=study_description,
            series_number=series_number,
            window=window,
        )
        path = folder / filename_pattern.format(index=k + 1)
        _save(ds, path)
        paths.append(path)
    return paths


def write_ct_file(
    volume: Volume,
    path: str | os.PathLike,
    *,
    k: int = 0,
    series_description: str = "medvit-explain CT",
    uid_seed: str | int | None = None,
    uid_prefix: str | None = None,
    patient_id: str = "PHANTOM",
    window: tuple[float, float] = (40.0, 400.0),
) -> Path:
    """Write slice ``k`` of ``volume`` as one CT DICOM file at ``path`` (a single-image "series").

    The stored image is ``volume.array[:, :, k]`` with the slice's own position; a reader gets a
    ``[X, Y, 1]`` volume whose k spacing is ``SliceThickness`` (``volume.spacing[2]``).
    """
    if not 0 <= k < volume.shape[2]:
        raise ValueError(f"expected 0 <= k < {volume.shape[2]}, got k={k}")
    _check_geometry(volume)
    uids = series_uids(uid_seed, volume, uid_prefix=uid_prefix, extra=(series_description, patient_id, f"single:{k}"))
    ds = ct_slice_dataset(
        volume,
        k,
        uids=uids,
        rescale=rescale_for(volume.array[:, :, k]),
        series_description=series_description,
        patient_id=patient_id,
        window=window,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(ds, path)
    return path
