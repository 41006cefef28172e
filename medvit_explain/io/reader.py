"""Read a CT from disk into a :class:`~medvit_explain.volume.Volume` (HU, float32, LPS geometry).

SimpleITK reads every format (it applies DICOM rescale slope/intercept and sorts a series with GDCM);
pydicom reads only headers (modality, UIDs, positions) to choose a series and to check it.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import (
    InputNotFoundError,
    ModalityError,
    SeriesSelectionError,
    UnreadableImageError,
    UnsupportedImageError,
)
from ..vocabulary import VOLUME_SUFFIXES
from ..volume import Volume

log = logging.getLogger(__name__)
sitk.ProcessObject_SetGlobalWarningDisplay(False)

SLICE_SPACING_RTOL = 0.01  # relative tolerance on slice-to-slice distance within a series
SLICE_SPACING_ATOL = 1e-3  # mm


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    description: str
    modality: str
    files: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.uid} '{self.description}' ({self.modality}, {len(self.files)} slices)"


def load_volume(path: str | os.PathLike, *, series_uid: str | None = None, allow_modality: bool = False) -> Volume:
    """Load a CT volume: NIfTI, NRRD, MHA/MHD, a single DICOM file or a folder with a DICOM series.

    Args:
        path: file or folder.
        series_uid: the SeriesInstanceUID to load when a folder holds several series.
        allow_modality: load a non-CT DICOM instead of refusing it.

    Returns:
        a :class:`Volume` with float32 HU values in ``[X, Y, Z]`` order and LPS geometry.

    Raises:
        MedvitInputError subclasses, each with a one-line message saying what was wrong.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"input not found: {path} (check the path)")
    if path.is_dir():
        return _load_dicom_folder(path, series_uid, allow_modality)
    if path.stat().st_size == 0:
        raise UnreadableImageError(f"{path} is an empty file, not an image")
    name = path.name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        if name.endswith(".gz"):
            _check_gzip(path)
        if name.endswith((".mha", ".mhd", ".nrrd", ".nhdr")):
            _check_text_header_spacing(path)
        image = _read_sitk(path)
        if name.endswith((".nii", ".nii.gz")):
            _check_nifti_header_and_values(path)
        return _to_volume(image, {"path": str(path), "format": _format_of(name), "modality": "CT"})
    header = _read_dicom_header(path)
    if header is None:
        raise UnreadableImageError(
            f"{path} is not a readable image: expected NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, "
            "a DICOM file or a folder holding a DICOM series"
        )
    _check_modality(header, path, allow_modality)
    _check_pixel_format(header, path)
    image = _read_sitk(path)
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
        thickness = float(getattr(header, "SliceThickness", 0) or 0) or 1.0
        image.SetSpacing((*image.GetSpacing()[:2], thickness))
    meta = _dicom_metadata(header, path)
    meta.update({"path": str(path), "format": "dicom", "dicom_files": [str(path)]})
    return _to_volume(image, meta)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a ``.dcm`` name, or the ``DICM`` marker after the 128-byte preamble."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as stream:
            stream.seek(128)
            return stream.read(4) == b"DICM"
    except OSError:
        return False


def find_dicom_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM series in ``folder`` (searched recursively), as GDCM groups them."""
    folder = str(folder)
    series = []
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ():
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid, False, True)
        header = _read_dicom_header(Path(files[0])) if files else None
        series.append(
            SeriesInfo(
                uid=uid,
                description=str(getattr(header, "SeriesDescription", "") or ""),
                modality=str(getattr(header, "Modality", "") or "?"),
                files=tuple(files),
            )
        )
    return series


def _load_dicom_folder(folder: Path, series_uid: str | None, allow_modality: bool) -> Volume:
    if not any(folder.iterdir()):
        raise InputNotFoundError(f"{folder} is an empty folder; expected a DICOM series")
    series = find_dicom_series(folder)
    if not series:
        raise UnreadableImageError(
            f"no DICOM series found in {folder}; expected a folder of DICOM files "
            "(for a NIfTI/NRRD file pass the file itself)"
        )
    if series_uid is not None:
        chosen = [s for s in series if s.uid == series_uid]
        if not chosen:
            raise SeriesSelectionError(
                f"series {series_uid} not found in {folder}; found: " + "; ".join(s.describe() for s in series)
            )
        info = chosen[0]
    elif len(series) > 1:
        raise SeriesSelectionError(
            f"{folder} holds {len(series)} DICOM series; choose one with --series UID: "
            + "; ".join(s.describe() for s in series)
        )
    else:
        info = series[0]
    header = _read_dicom_header(Path(info.files[0]))
    if header is None:
        raise UnreadableImageError(f"cannot read the DICOM header of {info.files[0]}")
    _check_modality(header, folder, allow_modality)
    _check_pixel_format(header, folder)
    headers = [_read_dicom_header(Path(f)) for f in info.files]
    _check_slice_spacing(headers, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(info.files))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise UnreadableImageError(f"cannot read the DICOM series in {folder}: {_first_line(exc)}") from None
    meta = _dicom_metadata(header, folder)
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
    return _to_volume(image, meta)


def _read_sitk(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise UnreadableImageError(
            f"cannot read {path}: the file is corrupt, truncated or not an image ({_first_line(exc)})"
        ) from None


def _check_gzip(path: Path) -> None:
    """ITK silently zero-fills a truncated gzip stream; read it through once to catch that."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error):
        raise UnreadableImageError(
            f"cannot read {path}: the gzip stream is truncated or corrupt (re-export or re-copy the file)"
        ) from None


def _check_nifti_header_and_values(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN into 0 and zero pixdims into 1; check the file itself."""
    import nibabel as nib

    logging.getLogger("nibabel").setLevel(logging.ERROR)
    image = nib.load(str(path))
    opener = nib.openers.ImageOpener(str(path))
    with opener as stream:  # unchecked: nib.load "repairs" zero pixdims on the way in
        raw_header = type(image.header).from_fileobj(stream, check=False)
    pixdim = np.asarray(raw_header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise UnsupportedImageError(
            f"{path} has invalid voxel spacing {tuple(pixdim.tolist())} in its header; every spacing must be "
            "positive (fix the header)"
        )
    if np.issubdtype(image.get_data_dtype(), np.floating):
        data = np.asanyarray(image.dataobj)
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise UnsupportedImageError(f"{path} has {bad} NaN or infinite voxels; expected finite HU values")


def _check_text_header_spacing(path: Path) -> None:
    """ITK turns a negative MetaImage/NRRD spacing into a flipped axis; we refuse such a header instead."""
    with open(path, "rb") as stream:
        head = stream.read(8192).split(b"\n\n", 1)[0].decode("latin-1", errors="replace")
    for line in head.splitlines():
        key, sep, value = line.partition("=") if "=" in line else line.partition(":")
        if sep and key.strip().lower() in ("elementspacing", "elementsize", "spacings"):
            try:
                values = [float(v) for v in value.split()]
            except ValueError:
                continue
            if any(not np.isfinite(v) or v <= 0 for v in values):
                raise UnsupportedImageError(
                    f"{path} has invalid voxel spacing {tuple(values)} in its header; every spacing must be "
                    "positive (fix the header)"
                )


def _read_dicom_header(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("pydicom").setLevel(logging.ERROR)
            return pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, KeyError, EOFError):
        return None


def _check_modality(header, where: Path, allow_modality: bool) -> None:
    modality = str(getattr(header, "Modality", "") or "")
    if modality and modality != "CT":
        msg = f"{where} is {modality}, not CT; the model expects CT in Hounsfield units"
        if not allow_modality:
            raise ModalityError(msg + " (pass --allow-modality to use it anyway)")
        warnings.warn(msg, stacklevel=3)


def _check_pixel_format(header, where: Path) -> None:
    samples = int(getattr(header, "SamplesPerPixel", 1) or 1)
    photometric = str(getattr(header, "PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise UnsupportedImageError(
            f"{where} is a colour ({photometric}, {samples} samples per pixel) DICOM; "
            "expected a greyscale CT (MONOCHROME1/2)"
        )


def _check_slice_spacing(headers, folder: Path) -> None:
    """Refuse a series whose slices are not evenly spaced (missing or duplicated slices)."""
    if len(headers) < 3:
        return
    try:
        orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3)
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError):
        raise UnreadableImageError(
            f"malformed DICOM series in {folder}: slices lack ImagePositionPatient/ImageOrientationPatient"
        ) from None
    normal = np.cross(orientation[0], orientation[1])
    steps = np.diff(positions @ normal)
    median = float(np.median(steps))
    if abs(median) < SLICE_SPACING_ATOL:
        raise UnsupportedImageError(f"the DICOM series in {folder} has slices at the same position")
    if np.any(np.abs(steps - median) > SLICE_SPACING_ATOL + SLICE_SPACING_RTOL * abs(median)):
        raise UnsupportedImageError(
            f"inconsistent slice spacing in the DICOM series in {folder} "
            f"(steps from {np.abs(steps).min():.3g} to {np.abs(steps).max():.3g} mm): slices missing or "
            "duplicated; export the complete series"
        )


def _dicom_metadata(header, path: Path) -> dict:
    keys = [
        "Modality",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "FrameOfReferenceUID",
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "SeriesDescription",
        "SeriesNumber",
        "Manufacturer",
    ]
    meta = {}
    for key in keys:
        value = getattr(header, key, None)
        if value is not None:
            meta[_snake(key)] = str(value)
    meta.setdefault("modality", "CT")
    return meta


def _to_volume(image: sitk.Image, metadata: dict) -> Volume:
    path = metadata.get("path", "input")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UnsupportedImageError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
            "image); expected a greyscale CT volume"
        )
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise UnsupportedImageError(
            f"{path} is a {image.GetDimension()}D image of size {image.GetSize()}; expected a 3D volume"
        )
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise UnsupportedImageError(
            f"{path} has invalid voxel spacing {tuple(spacing)}; every spacing must be positive (fix the header)"
        )
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise UnsupportedImageError(f"{path} has non-orthonormal direction cosines; expected a rotation")
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0).astype(np.float32)
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise UnsupportedImageError(f"{path} has {bad} NaN or infinite voxels; expected finite HU values")
    log.debug("loaded %s: shape %s spacing %s", path, array.shape, spacing)
    return Volume(array, np.array(image.GetOrigin()), spacing, direction, metadata)


def _format_of(name: str) -> str:
    for suffix, fmt in (
        (".nii.gz", "nifti"),
        (".nii", "nifti"),
        (".nrrd", "nrrd"),
        (".nhdr", "nrrd"),
        (".mha", "metaimage"),
        (".mhd", "metaimage"),
    ):
        if name.endswith(suffix):
            return fmt
    return "unknown"


def _snake(key: str) -> str:
    out = []
    for i, ch in enumerate(key):
        if ch.isupper() and i and (not key[i - 1].isupper() or (i + 1 < len(key) and key[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file/line location; the description is usually the last line.
    return lines[-1][:200] if lines else type(exc).__name__
