"""DICOM headers: reading them (pydicom, no pixels) and the checks a single DICOM file and a series folder share.

Modality (CT only, unless allowed), pixel format (greyscale), rescale slope/intercept (finite, non-zero
slope), the metadata a :class:`~medvit_explain.volume.Volume` carries, and the one-line reason a C++ reader
failed (used by both the file and the series readers).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

from ..errors import MedvitWarning, ModalityError, UnsupportedImageError, printable
from .quiet import NativeOutput

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # SOP class root of the Secondary Capture images


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


def _attr(header, key: str, default=None):
    """A DICOM attribute as text, ``default`` when absent or empty, ``"<unreadable>"`` when malformed
    (pydicom converts values on access and raises for, say, a DS that is not a number)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = getattr(header, key, None)
    except (ValueError, TypeError, OverflowError):
        return "<unreadable>"
    return default if value is None or str(value) == "" else str(value)


def _check_dicom_headers(headers: list, names: list[str], where: Path, allow_modality: bool) -> None:
    """Modality, pixel format and rescale of a DICOM file or series, before ITK reads the pixels."""
    _check_modality(headers[0], where, allow_modality)
    _check_pixel_format(headers[0], where)
    _check_rescale(headers, names)


def _check_modality(header, where: Path, allow_modality: bool) -> None:
    reason, advice = _not_ct(header)
    if reason is None:
        return
    msg = f"{where} {reason}; the model expects CT in Hounsfield units"
    if not allow_modality:
        raise ModalityError(f"{msg} ({advice})")
    warnings.warn(msg, MedvitWarning, stacklevel=5)


def _not_ct(header) -> tuple[str | None, str]:
    """``(why this is not taken as CT, what to do)``, or ``(None, "")`` for a CT image."""
    modality = printable(_attr(header, "Modality", "")).strip()
    sop_class = _attr(header, "SOPClassUID", "") or _attr(
        getattr(header, "file_meta", None), "MediaStorageSOPClassUID", ""
    )
    if not modality:
        return "has no Modality attribute", "pass --allow-modality if it is a CT"
    if modality != "CT":
        return f"is {modality}, not CT", "pass --allow-modality to use it anyway"
    if sop_class == SECONDARY_CAPTURE or sop_class.startswith(SECONDARY_CAPTURE + "."):
        return (
            f"is a Secondary Capture image (SOP class {printable(sop_class)}), not a CT acquisition",
            "pass --allow-modality if it holds CT values in HU",
        )
    return None, ""


def _check_pixel_format(header, where: Path) -> None:
    samples = int(getattr(header, "SamplesPerPixel", 1) or 1)
    photometric = printable(getattr(header, "PhotometricInterpretation", "MONOCHROME2"))
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise UnsupportedImageError(
            f"{where} is a colour ({photometric}, {samples} samples per pixel) DICOM; "
            "expected a greyscale CT (MONOCHROME1/2)"
        )


def _check_rescale(headers: list, names: list[str]) -> None:
    """GDCM applies ``RescaleSlope`` 0 (every voxel becomes the intercept) or NaN without complaint."""
    for header, name in zip(headers, names):
        for key, default in (("RescaleSlope", "1"), ("RescaleIntercept", "0")):
            text = _attr(header, key, default)
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if key == "RescaleSlope" and value == 0:
                raise UnsupportedImageError(
                    f"{printable(name)}: RescaleSlope is 0: every voxel would be the intercept; "
                    "fix or re-export the DICOM (expected a non-zero slope)"
                )
            if not math.isfinite(value):
                raise UnsupportedImageError(
                    f"{printable(name)}: {key} is {printable(text)}; expected a finite number "
                    "(fix or re-export the DICOM)"
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
        try:
            value = getattr(header, key, None)
        except (ValueError, TypeError, OverflowError):  # a malformed value: leave it out
            value = None
        if value is not None:
            meta[_snake(key)] = str(value)
    if not meta.get("modality"):  # loaded only with allow_modality: say we do not know
        meta["modality"] = "unknown"
    return meta


def _snake(key: str) -> str:
    out = []
    for i, ch in enumerate(key):
        if ch.isupper() and i and (not key[i - 1].isupper() or (i + 1 < len(key) and key[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def _reason(exc: BaseException, native: NativeOutput) -> str:
    """Why a C++ reader failed: what it printed to descriptor 2 if anything, else its exception's last line."""
    text = " ".join(native.lines) if native.lines else _first_line(exc)
    return " ".join(printable(text).split())[:200]


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a file/line location; the description is usually the last line.
    return lines[-1][:200] if lines else type(exc).__name__
