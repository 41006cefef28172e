"""The studies of a dataset: one ``Study`` type and one manifest CSV format for every workflow.

A manifest CSV has one row per study with the columns ``study_id`` and ``path`` (a NIfTI/NRRD/MHA file,
a DICOM file or a DICOM series folder; relative paths are relative to the CSV's folder) and, optionally,
``nodule_mask`` (an instance mask on the CT's grid), ``labels`` (a phantom-style JSON with
``nodules[].malignancy``) and ``malignancy`` (0/1, the study-level label; it wins over ``labels``).
The older training layout is read the same way: a column ``image`` instead of ``path``, and
``study_id`` optional (the image's file name then).

``read_manifest`` (batch) takes any study with an image, a folder is scanned for NIfTI files and DICOM
series, and study ids must be unique, case aside (they name output folders). ``find_studies`` (train, evaluate,
audit) needs a ``nodule_mask`` and ``labels`` in every row, and a folder is a folder of phantoms as
``make-phantom`` writes them (``<name>.nii.gz``, ``<name>_nodules.nii.gz``, ``<name>.json``); there the
labels JSON is read when the study is loaded, so a broken one is that study's error.

Everything is checked before anything is written: a missing column, a missing file, a study_id that is
not a safe folder name (see :func:`check_study_id`), a duplicate ``study_id`` or an unreadable label raises
:class:`MedvitInputError` with one line naming the row.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import MedvitInputError, printable
from ..vocabulary import PHANTOM_MASK_SUFFIXES, VOLUME_SUFFIXES

__all__ = ["Study", "check_study_id", "find_phantoms", "find_studies", "malignancy_from_labels", "read_manifest"]

REQUIRED_COLUMNS = ("study_id", "path")
OPTIONAL_COLUMNS = ("nodule_mask", "labels", "malignancy")
LEGACY_IMAGE_COLUMN = "image"  # the older training manifests' name for ``path``
LABELLED_COLUMNS = ("nodule_mask", "labels")  # what train / evaluate / audit need in every row
MASK_SUFFIXES = PHANTOM_MASK_SUFFIXES  # phantom masks next to a CT are not studies
# a study_id names a folder and prefixes its files: ``<id>_<method>_<target>_pm.dcm`` must fit the 255 bytes
# of a file name with the longest method name (23) and a long target name, so ids stop at 128 characters
MAX_ID_LENGTH = 128
_STUDY_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}")
ID_RULE = f"1 to {MAX_ID_LENGTH} letters, digits, '.', '_' or '-', not starting with '.'"


@dataclass(frozen=True)
class Study:
    """One study: its id (a batch's output folder name), its image and its optional labels.

    ``malignancy`` is the study-level label: the manifest's value, or max over the labels JSON's nodules
    where that file was read (``read_manifest``); None when unknown or not read yet (``find_studies``).
    """

    study_id: str
    path: str
    nodule_mask: str | None = None
    labels: str | None = None
    malignancy: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_manifest(source: str | os.PathLike, reserved: Collection[str] = ()) -> list[Study]:
    """The studies of a manifest CSV or of a folder (see the module docstring); raises MedvitInputError.

    ``reserved``: names a study_id may not take, whatever their case (a batch job's own files at the top
    of its output folder, see :data:`medvit_explain.batch.records.JOB_FILES`)."""
    source = Path(source)
    if not source.exists():
        raise MedvitInputError(
            f"manifest not found: {printable(source)} (expected a CSV with study_id,path or a folder)"
        )
    studies = _scan_folder(source, reserved) if source.is_dir() else _read_csv(source, reserved=reserved)
    if not studies:
        raise MedvitInputError(f"manifest {printable(source)} lists no study")
    seen: dict[str, str] = {}
    for study in studies:
        # case-insensitive: on macOS and Windows file systems "A" and "a" would share one output folder
        key = study.study_id.lower()
        if key in seen:
            same = "" if seen[key] == study.study_id else f" (as {seen[key]!r}; ids may not differ only in case)"
            raise MedvitInputError(f"manifest {printable(source)}: duplicate study_id {study.study_id!r}{same}")
        seen[key] = study.study_id
    return studies


def check_study_id(study_id: str, where: str, reserved: Collection[str] = ()) -> str:
    """``study_id`` if it is a safe output folder name, else MedvitInputError naming ``where`` and the id.

    Allowed: 1 to ``MAX_ID_LENGTH`` ASCII letters, digits, ``.``, ``_`` and ``-``, not starting with ``.``
    (so no empty id, no ``.``/``..``, no hidden name, no ``/``, ``\\``, NUL or control character), and
    none of ``reserved`` in any case."""
    shown = printable(repr(study_id if len(study_id) <= 60 else study_id[:60] + "..."))
    if not study_id:
        problem = "is empty"
    elif len(study_id) > MAX_ID_LENGTH:
        problem = f"is too long ({len(study_id)} characters)"
    elif study_id in (".", ".."):
        problem = "is not a folder name"
    elif study_id.startswith("."):
        problem = "starts with '.' (a hidden name)"
    elif any(c in study_id for c in "/\\"):
        problem = "contains a path separator"
    elif any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in study_id):
        problem = "contains control characters"
    elif not _STUDY_ID.fullmatch(study_id):
        problem = "contains characters other than letters, digits, '.', '_' and '-'"
    elif study_id.lower() in {name.lower() for name in reserved}:
        problem = "is the name of one of the batch job's own files"
    else:
        return study_id
    others = f", and none of {', '.join(reserved)}" if reserved else ""
    raise MedvitInputError(f"{where}: study_id {shown} {problem}; expected {ID_RULE}{others}")


def find_studies(data: str | os.PathLike) -> list[Study]:
    """The labelled studies (image, nodule mask, labels JSON) of a phantom folder or a manifest CSV."""
    data = Path(data)
    if not data.exists():
        raise MedvitInputError(f"training data not found: {data}")
    if data.is_dir():
        return find_phantoms(data)
    studies = _read_csv(data, labelled=True)
    if not studies:
        raise MedvitInputError(f"manifest {data} lists no study")
    return studies


def find_phantoms(folder: str | os.PathLike) -> list[Study]:
    """The phantoms of a folder, as ``make-phantom`` writes them: each ``<name>.json`` with
    ``<name>.nii.gz`` and ``<name>_nodules.nii.gz`` beside it (sorted by name, not recursive)."""
    folder = Path(folder)
    studies = []
    for labels in sorted(folder.glob("*.json")):
        name = labels.stem
        image, mask = folder / f"{name}.nii.gz", folder / f"{name}_nodules.nii.gz"
        if image.exists() and mask.exists():
            studies.append(Study(name, str(image), str(mask), str(labels)))
    if not studies:
        raise MedvitInputError(f"no phantoms (<name>.nii.gz, <name>_nodules.nii.gz, <name>.json) in {folder}")
    return studies


# --------------------------------------------------------------------------- CSV
def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedvitInputError(f"cannot read manifest {path}: {exc}") from None
    return columns, rows


def _check_columns(path: Path, columns: list[str], labelled: bool) -> str:
    """The image column (``path``, or ``image`` in the older layout); raises for a missing column."""
    legacy = "path" not in columns and LEGACY_IMAGE_COLUMN in columns
    need = [LEGACY_IMAGE_COLUMN] if legacy else list(REQUIRED_COLUMNS)
    need += list(LABELLED_COLUMNS) if labelled else []
    missing = [c for c in need if c not in columns]
    if missing:
        expected = f"{','.join(REQUIRED_COLUMNS)}[,{','.join(OPTIONAL_COLUMNS)}]"
        if labelled:
            expected = f"{','.join(REQUIRED_COLUMNS + LABELLED_COLUMNS)}[,malignancy]"
        raise MedvitInputError(
            f"manifest {path} is missing the column(s) {', '.join(missing)}; expected {expected} "
            f"(or image instead of path), got {','.join(columns) or 'no header'}"
        )
    return LEGACY_IMAGE_COLUMN if legacy else "path"


def _read_csv(path: Path, labelled: bool = False, reserved: Collection[str] = ()) -> list[Study]:
    columns, rows = _read_rows(path)
    image_column = _check_columns(path, columns, labelled)
    base = path.parent
    studies = []
    for line, row in enumerate(rows, start=2):
        where = f"manifest {printable(path)} line {line}"
        study_id = check_study_id(_row_id(row, image_column), where, reserved)
        image = _existing(base, row.get(image_column, ""), where, image_column, required=True)
        mask = _existing(base, row.get("nodule_mask", ""), where, "nodule_mask", required=labelled)
        labels = _existing(base, row.get("labels", ""), where, "labels", required=labelled)
        malignancy = _malignancy_value(row.get("malignancy", ""), where)
        if malignancy is None and labels is not None and not labelled:
            malignancy = malignancy_from_labels(labels, where)
        studies.append(Study(study_id, image, mask, labels, malignancy))
    return studies


def _row_id(row: dict[str, str], image_column: str) -> str:
    """The row's ``study_id`` (checked by the caller); in the older layout without one, the image's file
    name made safe."""
    study_id = row.get("study_id", "")
    if not study_id and image_column == LEGACY_IMAGE_COLUMN:
        name = Path(row[image_column]).name
        return name if _STUDY_ID.fullmatch(name) else _safe_id(name)
    return study_id


def _existing(base: Path, value: str, where: str, column: str, required: bool = False) -> str | None:
    if not value:
        if required:
            raise MedvitInputError(f"{where}: empty {column}")
        return None
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise MedvitInputError(f"{where}: {column} not found: {printable(p)}")
    return str(p.resolve())


def _malignancy_value(value: str, where: str) -> int | None:
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number not in (0.0, 1.0):
        raise MedvitInputError(f"{where}: expected malignancy 0 or 1 (or empty), got {value!r}")
    return int(number)


def malignancy_from_labels(labels: str | os.PathLike, where: str = "") -> int:
    """Study-level malignancy of a phantom-style JSON: 1 if any nodule is malignant, else 0."""
    try:
        data = json.loads(Path(labels).read_text())
        nodules = data["nodules"] if isinstance(data, dict) else data
        return int(max((int(n.get("malignancy", 0)) for n in nodules), default=0) > 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        prefix = f"{where}: " if where else ""
        raise MedvitInputError(
            f"{prefix}cannot read labels {printable(labels)} (expected JSON with nodules[].malignancy): "
            f"{type(exc).__name__}: {printable(exc)}"
        ) from None


# --------------------------------------------------------------------------- folder
def _image_stem(name: str) -> str | None:
    low = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _holds_dicom(folder: Path) -> bool:
    files = [p for p in sorted(folder.iterdir())[:20] if p.is_file() and not p.name.startswith(".")]
    from ..io.reader import is_dicom_file

    return any(is_dicom_file(p) for p in files)


def _safe_id(text: str) -> str:
    """``text`` as a study_id: other characters than letters, digits, '.', '_', '-' become '_', no leading
    '.', cut to ``MAX_ID_LENGTH`` (two names that become one id are then refused as duplicates)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "study"
    return cleaned[:MAX_ID_LENGTH]


def _walk_images(root: Path) -> list[tuple[str, str, Path]]:
    """``(name, relative id, path)`` of each image file (not a mask) and each DICOM series folder."""
    found: list[tuple[str, str, Path]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder)
        if here != root and _holds_dicom(here):
            dirs[:] = []  # a series folder is one study; do not descend into it
            rel = here.relative_to(root)
            found.append((here.name, "_".join(rel.parts), here))
            continue
        for name in sorted(files):
            stem = _image_stem(name)
            if stem is None or name.startswith(".") or stem.endswith(MASK_SUFFIXES):
                continue
            rel = (here / stem).relative_to(root)
            found.append((stem, "_".join(rel.parts), here / name))
    return found


def _scan_folder(root: Path, reserved: Collection[str] = ()) -> list[Study]:
    """Each image file (not a ``*_nodules``/``*_lungs``/``*_features`` mask) and each folder holding DICOM files
    is a study.

    The labels ``<name>.json`` and mask ``<name>_nodules.nii.gz`` beside an image (or beside a series
    folder ``<name>_dicom/``) are picked up. Study ids are the names; names that repeat in different
    sub-folders get their relative path (``a_b_name``) instead; both made safe by :func:`_safe_id`, and an
    id that is one of ``reserved`` is refused, naming the file to rename."""
    found = _walk_images(root)
    counts: dict[str, int] = {}
    for name, _, _ in found:
        counts[name] = counts.get(name, 0) + 1
    studies = []
    for name, rel_id, path in found:
        study_id = _safe_id(name if counts[name] == 1 else rel_id)
        check_study_id(study_id, f"folder {printable(root)}: {printable(path.relative_to(root))} (rename it)", reserved)
        base = name[: -len("_dicom")] if path.is_dir() and name.endswith("_dicom") else name
        labels = path.parent / f"{base}.json"
        mask = path.parent / f"{base}_nodules.nii.gz"
        labels_s = str(labels.resolve()) if labels.is_file() else None
        malignancy = malignancy_from_labels(labels_s, f"folder {root}") if labels_s else None
        studies.append(
            Study(study_id, str(path.resolve()), str(mask.resolve()) if mask.is_file() else None, labels_s, malignancy)
        )
    if not studies:
        raise MedvitInputError(
            f"no study in folder {printable(root)}: expected NIfTI/NRRD/MHA files or DICOM series folders"
        )
    return studies
