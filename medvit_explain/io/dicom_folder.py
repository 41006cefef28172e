"""DICOM series in a folder: the recursive search, choosing a series, reading it, and checking its geometry.

The search walks sub-folders without following folder links and merges a series split over several
folders; a series is refused when its slices are unevenly spaced, and a gantry-tilted one is resampled
onto an orthogonal grid (``metadata["resampled"]`` says so).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import (
    InputNotFoundError,
    MedvitWarning,
    SeriesSelectionError,
    UnreadableImageError,
    UnsupportedImageError,
    printable,
)
from .dicom_headers import _attr, _check_dicom_headers, _dicom_metadata, _read_dicom_header, _reason
from .quiet import native_stderr

SLICE_SPACING_RTOL = 0.01  # relative tolerance on slice-to-slice distance within a series
SLICE_SPACING_ATOL = 1e-3  # mm
TILT_TOLERANCE = 0.1  # lateral slice drift over a whole series (in in-plane voxels) still read as orthogonal
DICOM_SEARCH_LIMIT = 100_000  # files looked at under one folder before the search gives up


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    description: str
    modality: str
    files: tuple[str, ...]

    def describe(self) -> str:
        """One line for a terminal: UID, description, modality, slice count (control characters removed)."""
        return printable(f"{self.uid} '{self.description}' ({self.modality}, {len(self.files)} slices)")


def find_dicom_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM series under ``folder``, as GDCM groups them.

    The search walks sub-folders (``patient/study/series/*.dcm``) without following folder links, counts a
    file reached twice (through links) once, and merges a series split over several folders (its files
    then sorted by position along the slice normal). It stops with an error after
    ``DICOM_SEARCH_LIMIT`` files.
    """
    return _search_dicom(Path(folder)).series


def read_dicom_folder(folder: Path, series_uid: str | None, allow_modality: bool) -> tuple[sitk.Image, dict]:
    """The DICOM series under ``folder`` (the one ``series_uid`` names, or the only one), checked and read:
    ``(image, metadata)``, for :func:`~medvit_explain.io.reader.load_volume` to turn into a volume."""
    if not any(folder.iterdir()):
        raise InputNotFoundError(f"{folder} is an empty folder; expected a DICOM series")
    search = _search_dicom(folder)
    if not search.series:
        raise UnreadableImageError(
            f"no DICOM series found in {folder} (searched {search.files} files in {search.folders} folders, "
            "not following folder links); expected a folder of DICOM files "
            "(for a NIfTI/NRRD file pass the file itself)"
        )
    info = _choose_series(search.series, series_uid, folder)
    headers = [_read_dicom_header(Path(f)) for f in info.files]
    for name, header in zip(info.files, headers):
        if header is None:
            raise UnreadableImageError(f"cannot read the DICOM header of {printable(name)}")
    _check_dicom_headers(headers, list(info.files), folder, allow_modality)
    _check_slice_spacing(headers, folder)
    image = _read_series(info.files, folder)
    meta = _dicom_metadata(headers[0], folder)
    meta.update(
        {
            "path": str(folder),
            "format": "dicom-series",
            "dicom_files": list(info.files),
            "dicom_instances": [
                (str(getattr(h, "SOPClassUID", "")), str(getattr(h, "SOPInstanceUID", ""))) for h in headers
            ],
        }
    )
    image, resampled = _correct_gantry_tilt(image, headers, folder)
    if resampled is not None:
        meta["resampled"] = resampled
        warnings.warn(f"{folder}: {resampled}", MedvitWarning, stacklevel=3)
    return image, meta


def _choose_series(series: list[SeriesInfo], series_uid: str | None, folder: Path) -> SeriesInfo:
    """The series asked for, or the only one; several without a choice is an error listing them."""
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise SeriesSelectionError(
                f"series {printable(series_uid)} not found in {folder}; found: "
                + "; ".join(s.describe() for s in series)
            )
        return chosen[0]
    if len(series) > 1:
        raise SeriesSelectionError(
            f"{folder} holds {len(series)} DICOM series; choose one with --series UID: "
            + "; ".join(s.describe() for s in series)
        )
    return series[0]


def _read_series(files: tuple[str, ...], folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    with native_stderr() as native:
        try:
            return reader.Execute()
        except RuntimeError as exc:
            error = exc
    raise UnreadableImageError(f"cannot read the DICOM series in {folder}: {_reason(error, native)}") from None


# ---------------------------------------------------------------------------------------- DICOM search


@dataclass(frozen=True)
class _Search:
    series: list[SeriesInfo]
    files: int  # files looked at
    folders: int  # folders walked


def _search_dicom(folder: Path) -> _Search:
    """Group the DICOM files under ``folder`` into series (GDCM per folder, merged by UID, no duplicates)."""
    listing, folders = _walk_files(folder)
    groups: dict[str, list[str]] = {}
    sources: dict[str, set[str]] = {}
    seen: set[str] = set()
    for directory in listing:
        for uid, files in _gdcm_series_in(directory):
            for name in files:
                real = os.path.realpath(name)
                if real not in seen:
                    seen.add(real)
                    groups.setdefault(uid, []).append(name)
                    sources.setdefault(uid, set()).add(directory)
    series = []
    for uid, files in groups.items():
        ordered = _sorted_by_position(files) if len(sources[uid]) > 1 else files
        series.append(_series_info(uid, ordered))
    return _Search(series, sum(listing.values()), folders)


def _walk_files(folder: Path) -> tuple[dict[str, int], int]:
    """``({folder holding files: file count}, folders walked)`` under ``folder``; folder links not followed."""
    listing: dict[str, int] = {}
    total = walked = 0
    for directory, subfolders, files in os.walk(folder, followlinks=False):
        subfolders.sort()
        walked += 1
        if files:
            listing[directory] = len(files)
            total += len(files)
        if total > DICOM_SEARCH_LIMIT:
            raise UnreadableImageError(
                f"{folder} holds more than {DICOM_SEARCH_LIMIT} files (searched with its sub-folders); "
                "pass the folder of one series"
            )
    return listing, walked


def _gdcm_series_in(directory: str) -> list[tuple[str, list[str]]]:
    """``[(series UID, files sorted by GDCM)]`` of the DICOM files directly in ``directory``."""
    with native_stderr():
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory) or ()
        return [
            (uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid, False, False))) for uid in uids
        ]


def _series_info(uid: str, files: list[str]) -> SeriesInfo:
    header = _read_dicom_header(Path(files[0])) if files else None
    return SeriesInfo(
        uid=uid,
        description=_attr(header, "SeriesDescription", ""),
        modality=_attr(header, "Modality", "?"),
        files=tuple(files),
    )


def _sorted_by_position(files: list[str]) -> list[str]:
    """Files of one series found in several folders, sorted along the slice normal (else by InstanceNumber)."""
    headers = [_read_dicom_header(Path(f)) for f in files]
    geometry = _slice_geometry(headers)
    if geometry is not None:
        row, col, positions = geometry
        keys = list(positions @ np.cross(row, col))
    else:
        try:
            keys = [float(h.InstanceNumber) for h in headers]
        except (AttributeError, TypeError, ValueError):
            return files
    return [name for _, name in sorted(zip(keys, files), key=lambda pair: pair[0])]


# ---------------------------------------------------------------------------------------- slice geometry


def _check_slice_spacing(headers, folder: Path) -> None:
    """Refuse a series whose slices are not evenly spaced (missing or duplicated slices)."""
    if len(headers) < 3:
        return
    geometry = _slice_geometry(headers)
    if geometry is None:
        raise UnreadableImageError(
            f"malformed DICOM series in {folder}: slices lack ImagePositionPatient/ImageOrientationPatient"
        )
    row, col, positions = geometry
    steps = np.diff(positions @ np.cross(row, col))
    median = float(np.median(steps))
    if abs(median) < SLICE_SPACING_ATOL:
        raise UnsupportedImageError(f"the DICOM series in {folder} has slices at the same position")
    if np.any(np.abs(steps - median) > SLICE_SPACING_ATOL + SLICE_SPACING_RTOL * abs(median)):
        raise UnsupportedImageError(
            f"inconsistent slice spacing in the DICOM series in {folder} "
            f"(steps from {np.abs(steps).min():.3g} to {np.abs(steps).max():.3g} mm): slices missing or "
            "duplicated; export the complete series"
        )


def _correct_gantry_tilt(image: sitk.Image, headers: list, where: Path) -> tuple[sitk.Image, str | None]:
    """A gantry-tilted series (slice positions step along a direction that is not the slice normal) resampled
    onto an orthogonal grid; ``(image, None)`` untouched for any other series.

    ITK places such slices as if they were stacked along the normal, which puts slice ``k`` sideways of
    its real place by ``k * dz * tan(tilt)``. Returns the resampled image and a sentence saying what was done.
    """
    geometry = _slice_geometry(headers)
    if geometry is None:
        return image, None
    row, col, positions = geometry
    normal = np.cross(row, col)
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    along = float(step @ normal)
    lateral = float(np.linalg.norm(step - along * normal))
    drift = lateral * (len(positions) - 1)  # how far the last slice sits sideways of where ITK puts it
    if abs(along) < SLICE_SPACING_ATOL or drift <= TILT_TOLERANCE * min(image.GetSpacing()[:2]):
        return image, None
    _check_straight_stack(positions, step, where)
    angle = math.degrees(math.atan2(lateral, abs(along)))
    resampled = _resample_orthogonal(image, row, col, positions[0], step, normal * math.copysign(1.0, along))
    return resampled, f"gantry tilt {angle:.1f}° corrected: resampled onto an orthogonal grid"


def _slice_geometry(headers: list) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(row, col, positions [n, 3])`` of a series of at least two slices (unit row and column directions
    from the first slice's ImageOrientationPatient), or ``None`` when it has fewer slices or a slice lacks
    the attributes (or holds no finite numbers there, or a zero direction)."""
    if len(headers) < 2:
        return None
    try:
        orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3)
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError):
        return None
    norms = np.linalg.norm(orientation, axis=1)
    if not (np.all(np.isfinite(norms)) and np.all(norms > 0) and np.all(np.isfinite(positions))):
        return None
    row, col = orientation / norms[:, None]
    return row, col, positions


def _check_straight_stack(positions: np.ndarray, step: np.ndarray, where: Path) -> None:
    """A tilted series is resampled as one straight stack: every step between slices must be the same vector."""
    steps = np.diff(positions, axis=0)
    tolerance = SLICE_SPACING_ATOL + SLICE_SPACING_RTOL * float(np.linalg.norm(step))
    if np.any(np.linalg.norm(steps - step, axis=1) > tolerance):
        raise UnsupportedImageError(
            f"the slices of the tilted DICOM series in {where} are not evenly spaced along one line "
            "(slices missing, duplicated or shifted); export the complete series"
        )


def _resample_orthogonal(
    image: sitk.Image, row: np.ndarray, col: np.ndarray, origin: np.ndarray, step: np.ndarray, axis: np.ndarray
) -> sitk.Image:
    """Linear resampling of the sheared stack (axes ``row``, ``col``, ``step``) onto the orthogonal grid (axes
    ``row``, ``col``, ``axis``) that covers it, in-plane aligned with the first slice; outside is air (the
    volume's minimum)."""
    sheared = sitk.Cast(image, sitk.sitkFloat32)
    in_plane = np.array(image.GetSpacing()[:2], dtype=np.float64)
    length = float(np.linalg.norm(step))
    sheared.SetOrigin(tuple(float(v) for v in origin))
    sheared.SetSpacing((*in_plane.tolist(), length))
    sheared.SetDirection(tuple(np.column_stack([row, col, step / length]).ravel().tolist()))
    axes = np.column_stack([row, col, axis])
    spacing = np.array([*in_plane, abs(float(step @ axis))])
    size = np.array(image.GetSize(), dtype=np.float64)
    corners = np.array(np.meshgrid(*[[0.0, n - 1] for n in size], indexing="ij")).reshape(3, -1).T
    physical = np.array([sheared.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    local = (physical - origin) @ axes  # corner coordinates along row, col, axis
    low = np.floor(local.min(axis=0) / spacing + 1e-6) * spacing
    count = np.ceil((local.max(axis=0) - low) / spacing - 1e-6).astype(int) + 1
    air = float(sitk.GetArrayViewFromImage(sheared).min())
    return sitk.Resample(
        sheared,
        [int(n) for n in count],
        sitk.Transform(),
        sitk.sitkLinear,
        tuple(float(v) for v in origin + axes @ low),
        tuple(float(v) for v in spacing),
        tuple(axes.ravel().tolist()),
        air,
        sitk.sitkFloat32,
    )
