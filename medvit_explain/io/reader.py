"""Read a CT from disk into a :class:`~medvit_explain.volume.Volume` (HU, float32, LPS geometry).

SimpleITK reads every format (it applies DICOM rescale slope/intercept and sorts a series with GDCM);
pydicom reads only headers (modality, UIDs, positions) to choose a series and to check it; nibabel reads
NIfTI headers. Before a file reaches ITK it is checked for what ITK would read wrongly without a word:
DICOM content behind a NIfTI/NRRD/MetaImage name, voxel data cut short, complex or colour voxels, a
header whose data file lies outside its folder, a zero rescale slope. A gantry-tilted series is resampled
onto an orthogonal grid (``metadata["resampled"]`` says so). What the C++ readers print to file
descriptor 2 is captured (:mod:`.quiet`) and quoted in the error instead of reaching the terminal.

This module holds :func:`load_volume`, the single-file loaders and the NIfTI / gzip / MetaImage / NRRD
checks; DICOM series folders are in :mod:`.dicom_folder`, DICOM header checks in :mod:`.dicom_headers`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import (
    InputNotFoundError,
    MedvitInputError,
    UnreadableImageError,
    UnsupportedImageError,
    printable,
)
from ..vocabulary import VOLUME_SUFFIXES
from ..volume import Volume
from .checksum import GZIP_ERRORS, gzip_content
from .dicom_folder import SeriesInfo, find_dicom_series, read_dicom_folder
from .dicom_headers import _check_dicom_headers, _dicom_metadata, _first_line, _read_dicom_header, _reason
from .quiet import native_stderr

__all__ = ["SeriesInfo", "find_dicom_series", "is_dicom_file", "load_volume"]

log = logging.getLogger(__name__)
sitk.ProcessObject_SetGlobalWarningDisplay(False)

HEADER_LIMIT = 1 << 20  # bytes of a MetaImage / NRRD text header (with its LIST of data files) read
PATTERN_LIMIT = 100_000  # data files of a "pattern min max step" data-file field checked
# the data-file field, lower case, and how each format spells it (MetaImage, NRRD, NRRD's older spelling)
_DATA_FILE_KEYS = {"elementdatafile": "ElementDataFile", "data file": "data file", "datafile": "datafile"}


def load_volume(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    allow_modality: bool = False,
    allow_external_data: bool = False,
) -> Volume:
    """Load a CT volume: NIfTI, NRRD, MHA/MHD, a single DICOM file or a folder with a DICOM series.

    Args:
        path: file or folder (a folder is searched recursively for DICOM series).
        series_uid: the SeriesInstanceUID to load when a folder holds several series.
        allow_modality: load a non-CT DICOM (or one without a Modality, or a Secondary Capture) instead of
            refusing it; a :class:`~medvit_explain.errors.MedvitWarning` says what was loaded.
        allow_external_data: let a MetaImage / NRRD header read data files outside its own folder.

    Returns:
        a :class:`Volume` with float32 HU values in ``[X, Y, Z]`` order and LPS geometry. A gantry-tilted
        DICOM series comes back resampled onto an orthogonal grid, with ``metadata["resampled"]`` saying so.

    Raises:
        MedvitInputError subclasses, each with a one-line message saying what was wrong.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"input not found: {path} (check the path)")
    if path.is_dir():
        return _to_volume(*read_dicom_folder(path, series_uid, allow_modality))
    if path.stat().st_size == 0:
        raise UnreadableImageError(f"{path} is an empty file, not an image")
    suffix = _volume_suffix(path.name)
    if suffix is not None:
        return _load_volume_file(path, suffix, allow_external_data)
    return _load_dicom_file(path, allow_modality)


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


# ---------------------------------------------------------------------------------------- loading


def _load_volume_file(path: Path, suffix: str, allow_external_data: bool) -> Volume:
    """A NIfTI, NRRD or MetaImage file, checked first for what ITK would read wrongly without a word."""
    _refuse_dicom_content(path, suffix, _head(path))
    stored = path.stat().st_size
    if suffix.endswith(".gz"):
        stored, unpacked_head = _check_gzip(path)
        _refuse_dicom_content(path, suffix, unpacked_head)
    if suffix in (".nii", ".nii.gz"):
        _check_nifti(path, stored)
    else:
        _check_text_header(path, allow_external_data)
    image = _read_sitk(path)
    return _to_volume(image, {"path": str(path), "format": _format_of(suffix), "modality": "CT"})


def _load_dicom_file(path: Path, allow_modality: bool) -> Volume:
    header = _read_dicom_header(path)
    if header is None:
        raise UnreadableImageError(
            f"{path} is not a readable image: expected NIfTI (.nii/.nii.gz), NRRD, MHA/MHD, "
            "a DICOM file or a folder holding a DICOM series"
        )
    _check_dicom_headers([header], [str(path)], path, allow_modality)
    image = _read_sitk(path)
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
        thickness = float(getattr(header, "SliceThickness", 0) or 0) or 1.0
        image.SetSpacing((*image.GetSpacing()[:2], thickness))
    meta = _dicom_metadata(header, path)
    meta.update({"path": str(path), "format": "dicom", "dicom_files": [str(path)]})
    return _to_volume(image, meta)


def _read_sitk(path: Path) -> sitk.Image:
    with native_stderr() as native:
        try:
            return sitk.ReadImage(str(path))
        except RuntimeError as exc:
            error = exc
    raise UnreadableImageError(
        f"cannot read {path}: the file is corrupt, truncated or not an image ({_reason(error, native)})"
    ) from None


# ---------------------------------------------------------------------------------------- file checks


def _volume_suffix(name: str) -> str | None:
    """The volume suffix ``name`` ends with (``.nii.gz`` before ``.nii``), or ``None`` for any other name."""
    lower = name.lower()
    return next((suffix for suffix in VOLUME_SUFFIXES if lower.endswith(suffix)), None)


def _head(path: Path, size: int = 132) -> bytes:
    with open(path, "rb") as stream:
        return stream.read(size)


def _refuse_dicom_content(path: Path, suffix: str, head: bytes) -> None:
    """A DICOM file renamed ``.nii`` (or ``.nrrd``, ``.mha``...) would reach the wrong reader, or none."""
    if head[128:132] == b"DICM":
        raise UnreadableImageError(
            f"{path} holds DICOM data but is named {suffix}; rename it to .dcm (or pass its series folder)"
        )


def _check_gzip(path: Path) -> tuple[int, bytes]:
    """ITK silently zero-fills a truncated gzip stream; read it through once to catch that.

    Returns the decompressed size and its first 132 bytes (to look for a DICOM marker)."""
    try:
        return gzip_content(path, head=132)
    except GZIP_ERRORS:
        raise UnreadableImageError(
            f"cannot read {path}: the gzip stream is truncated or corrupt (re-export or re-copy the file)"
        ) from None


def _check_nifti(path: Path, stored_bytes: int) -> None:
    """What ITK's NIfTI reader gets wrong without a word: zero/negative pixdims (made 1 or flipped), complex
    voxels (imaginary part dropped), data cut short (garbage voxels), NaN (made 0).

    ``stored_bytes`` is the size of the (decompressed) file."""
    header = _nifti_header(path)
    _check_nifti_spacing(header, path)
    dtype = _nifti_dtype(header, path)
    _check_nifti_size(header, dtype, path, stored_bytes)
    if np.issubdtype(dtype, np.floating):
        _check_nifti_values(path)


def _nifti_header(path: Path):
    """The NIfTI header as stored (unchecked: ``nib.load`` "repairs" zero pixdims on the way in)."""
    import nibabel as nib

    logging.getLogger("nibabel").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = nib.load(str(path))
            with nib.openers.ImageOpener(str(path)) as stream:
                return type(image.header).from_fileobj(stream, check=False)
    except MedvitInputError:
        raise
    except Exception as exc:  # nibabel raises many types for one meaning: this is no readable NIfTI
        raise UnreadableImageError(
            f"cannot read {path} as NIfTI: {_first_line(exc)} (re-export the file, or check it is a NIfTI)"
        ) from None


def _check_nifti_spacing(header, path: Path) -> None:
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        raise UnsupportedImageError(
            f"{path} has invalid voxel spacing {tuple(pixdim.tolist())} in its header; every spacing must be "
            "positive (fix the header)"
        )


def _nifti_dtype(header, path: Path) -> np.dtype:
    """The voxel type; complex and colour (RGB/RGBA) voxels are refused."""
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:  # an unknown datatype code
        raise UnreadableImageError(
            f"{path} has an unknown NIfTI data type (code {printable(header['datatype'])}); re-export the file"
        ) from None
    if dtype.fields is not None or dtype.kind == "V":
        raise UnsupportedImageError(f"{path} holds colour (RGB) voxels; expected a greyscale CT volume")
    if dtype.kind == "c":
        raise UnsupportedImageError(
            f"{path} holds complex voxels ({dtype.name}); expected real HU values "
            "(save the magnitude or the real part as a real-valued image)"
        )
    return dtype


def _check_nifti_size(header, dtype: np.dtype, path: Path, stored_bytes: int) -> None:
    """``vox_offset + prod(shape) * itemsize`` must fit in the (decompressed) file; ITK reads garbage past it."""
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        offset = int(header.get_data_offset())
    except Exception:
        raise UnreadableImageError(f"{path} has a malformed NIfTI header (dimensions or data offset)") from None
    data = math.prod(shape) * dtype.itemsize
    if offset + data > stored_bytes:
        present = max(0, stored_bytes - offset)
        raise UnreadableImageError(
            f"{path} is cut short: its header describes {data} bytes of voxels {shape} but the file holds "
            f"{present} ({100 * present / max(data, 1):.0f}%); re-export or re-copy the file"
        )


def _check_nifti_values(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN into 0."""
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:
        raise UnreadableImageError(f"cannot read the voxels of {path}: {_first_line(exc)}") from None
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise UnsupportedImageError(f"{path} has {bad} NaN or infinite voxels; expected finite HU values")


@dataclass(frozen=True)
class _TextHeader:
    """A MetaImage or NRRD text header: lower-case keys to values, and the lines after the data-file line."""

    fields: dict[str, str]
    tail: list[str]

    @property
    def data_file(self) -> tuple[str, str] | None:
        """``(key as spelled in the format, value)`` of the data-file field, if any."""
        for key in _DATA_FILE_KEYS:
            if key in self.fields:
                return key, self.fields[key]
        return None


def _check_text_header(path: Path, allow_external_data: bool) -> None:
    """A MetaImage / NRRD header: positive spacings, and (unless allowed) data files inside its folder."""
    header = _read_text_header(path)
    _check_text_header_spacing(header, path)
    if not allow_external_data:
        _check_data_files(header, path)


def _read_text_header(path: Path) -> _TextHeader:
    with open(path, "rb") as stream:
        text = stream.read(HEADER_LIMIT).decode("latin-1")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    nrrd = text.startswith("NRRD")
    fields: dict[str, str] = {}
    for number, line in enumerate(lines):
        if nrrd and number == 0 or line.lstrip().startswith("#"):
            continue
        if not line.strip():
            if nrrd:  # a blank line ends a NRRD header; attached data follows
                break
            continue
        key, value = _split_field(line)
        if key is None:
            continue
        fields[key] = value
        if key in _DATA_FILE_KEYS:  # the last header field; a LIST of file names may follow
            return _TextHeader(fields, [rest.strip() for rest in lines[number + 1 :] if rest.strip()])
    return _TextHeader(fields, [])


def _split_field(line: str) -> tuple[str | None, str]:
    """``"Key = value"`` (MetaImage) or ``"key: value"`` (NRRD) → ``("key", "value")``."""
    cuts = [i for i in (line.find("="), line.find(":")) if i > 0]
    if not cuts:
        return None, ""
    cut = min(cuts)
    return line[:cut].strip().lower(), line[cut + 1 :].strip()


def _check_text_header_spacing(header: _TextHeader, path: Path) -> None:
    """ITK turns a negative MetaImage/NRRD spacing into a flipped axis; we refuse such a header instead."""
    for key in ("elementspacing", "elementsize", "spacings"):
        try:
            values = [float(v) for v in header.fields.get(key, "").split()]
        except ValueError:
            continue
        if any(not np.isfinite(v) or v <= 0 for v in values):
            raise UnsupportedImageError(
                f"{path} has invalid voxel spacing {tuple(values)} in its header; every spacing must be "
                "positive (fix the header)"
            )


def _check_data_files(header: _TextHeader, path: Path) -> None:
    """Every data file a header names must resolve (links followed) inside the header's folder, so a header
    cannot make us read ``/etc/passwd`` or a neighbour's files as voxels."""
    field = header.data_file
    if field is None:
        return
    key, value = field
    folder = path.parent.resolve()
    for name in _data_file_names(value, header.tail):
        try:
            target = (path.parent / name).resolve()
            inside = target.is_relative_to(folder)
        except (OSError, ValueError, RuntimeError):
            target, inside = Path(name), False
        if not inside:
            raise UnreadableImageError(
                f"{path} reads its voxels from {printable(target)}, outside the header's folder "
                f"({_DATA_FILE_KEYS[key]}: {printable(name)}); move the data file next to the header and name it there"
            )


def _data_file_names(value: str, tail: list[str]) -> list[str]:
    """The files a data-file field names: none for ``LOCAL``, the lines after it for ``LIST``, every file of a
    ``pattern min max step`` form, else the value itself."""
    tokens = value.split()
    if not tokens or tokens[0].upper() == "LOCAL":
        return []
    if tokens[0].upper() == "LIST":
        return tail
    if "%" in tokens[0] and len(tokens) >= 3:
        return _expand_pattern(tokens)
    return [value]


def _expand_pattern(tokens: list[str]) -> list[str]:
    """``["slice%03d.raw", "1", "40", "1"]`` → the 40 names; a pattern that does not expand is checked as is."""
    try:
        start, stop = int(tokens[1]), int(tokens[2])
        step = int(tokens[3]) if len(tokens) > 3 else 1
        if step == 0:
            return [tokens[0] % start]
        indices = range(start, stop + (1 if step > 0 else -1), step)
        return [tokens[0] % i for i in indices[:PATTERN_LIMIT]]
    except (ValueError, TypeError, OverflowError):
        return [tokens[0]]


# ---------------------------------------------------------------------------------------- volume


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
