"""Read a CT from disk into a :class:`~medvit_explain.volume.Volume` (HU, float32, LPS geometry).

SimpleITK reads every format (it applies DICOM rescale slope/intercept and sorts a series with GDCM);
pydicom reads only headers (modality, UIDs, positions) to choose a series and to check it; nibabel reads
NIfTI headers. Before a file reaches ITK it is checked for what ITK would read wrongly without a word:
DICOM content behind a NIfTI/NRRD/MetaImage name, voxel data cut short, complex or colour voxels, a
header whose data file lies outside its folder, a zero rescale slope. A gantry-tilted series is resampled
onto an orthogonal grid (``metadata["resampled"]`` says so). What the C++ readers print to file
descriptor 2 is captured (:mod:`.quiet`) and quoted in the error instead of reaching the terminal.
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
    MedvitWarning,
    ModalityError,
    SeriesSelectionError,
    UnreadableImageError,
    UnsupportedImageError,
    printable,
)
from ..vocabulary import VOLUME_SUFFIXES
from ..volume import Volume
from .quiet import NativeOutput, native_stderr

log = logging.getLogger(__name__)
sitk.ProcessObject_SetGlobalWarningDisplay(False)

SLICE_SPACING_RTOL = 0.01  # relative tolerance on slice-to-slice distance within a series
SLICE_SPACING_ATOL = 1e-3  # mm
TILT_TOLERANCE = 0.1  # lateral slice drift over a whole series (in in-plane voxels) still read as orthogonal
DICOM_SEARCH_LIMIT = 100_000  # files looked at under one folder before the search gives up
HEADER_LIMIT = 1 << 20  # bytes of a MetaImage / NRRD text header (with its LIST of data files) read
PATTERN_LIMIT = 100_000  # data files of a "pattern min max step" data-file field checked
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # SOP class root of the Secondary Capture images
# the data-file field, lower case, and how each format spells it (MetaImage, NRRD, NRRD's older spelling)
_DATA_FILE_KEYS = {"elementdatafile": "ElementDataFile", "data file": "data file", "datafile": "datafile"}


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    description: str
    modality: str
    files: tuple[str, ...]

    def describe(self) -> str:
        """One line for a terminal: UID, description, modality, slice count (control characters removed)."""
        return printable(f"{self.uid} '{self.description}' ({self.modality}, {len(self.files)} slices)")


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
        return _load_dicom_folder(path, series_uid, allow_modality)
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


def find_dicom_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The DICOM series under ``folder``, as GDCM groups them.

    The search walks sub-folders (``patient/study/series/*.dcm``) without following folder links, counts a
    file reached twice (through links) once, and merges a series split over several folders (its files
    then sorted by position along the slice normal). It stops with an error after
    ``DICOM_SEARCH_LIMIT`` files.
    """
    return _search_dicom(Path(folder)).series


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


def _load_dicom_folder(folder: Path, series_uid: str | None, allow_modality: bool) -> Volume:
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
    return _to_volume(image, meta)


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


def _read_sitk(path: Path) -> sitk.Image:
    with native_stderr() as native:
        try:
            return sitk.ReadImage(str(path))
        except RuntimeError as exc:
            error = exc
    raise UnreadableImageError(
        f"cannot read {path}: the file is corrupt, truncated or not an image ({_reason(error, native)})"
    ) from None


def _read_series(files: tuple[str, ...], folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    with native_stderr() as native:
        try:
            return reader.Execute()
        except RuntimeError as exc:
            error = exc
    raise UnreadableImageError(f"cannot read the DICOM series in {folder}: {_reason(error, native)}") from None


def _reason(exc: BaseException, native: NativeOutput) -> str:
    """Why a C++ reader failed: what it printed to descriptor 2 if anything, else its exception's last line."""
    text = " ".join(native.lines) if native.lines else _first_line(exc)
    return " ".join(printable(text).split())[:200]


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
    try:
        orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3)
        normal = np.cross(orientation[0], orientation[1])
        keys = [float(np.array([float(v) for v in h.ImagePositionPatient]) @ normal) for h in headers]
    except (AttributeError, TypeError, ValueError):
        try:
            keys = [float(h.InstanceNumber) for h in headers]
        except (AttributeError, TypeError, ValueError):
            return files
    return [name for _, name in sorted(zip(keys, files), key=lambda pair: pair[0])]


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
    import gzip
    import zlib

    size, head = 0, b""
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 24):
                head += chunk[: max(0, 132 - len(head))]
                size += len(chunk)
    except (EOFError, OSError, zlib.error):
        raise UnreadableImageError(
            f"cannot read {path}: the gzip stream is truncated or corrupt (re-export or re-copy the file)"
        ) from None
    return size, head


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


# ---------------------------------------------------------------------------------------- DICOM checks


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
    """``(row, col, positions [n, 3])`` of a series of at least two slices, or ``None`` without geometry."""
    if len(headers) < 2:
        return None
    try:
        orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3)
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    except (AttributeError, TypeError, ValueError):
        return None
    row, col = (axis / np.linalg.norm(axis) for axis in orientation)
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
