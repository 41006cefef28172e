"""The studies of a dataset: one ``Study`` type and one manifest CSV format for every workflow.

A manifest CSV has one row per study with the columns ``study_id`` and ``path`` (a NIfTI/NRRD/MHA file,
a DICOM file or a DICOM series folder; relative paths are relative to the CSV's folder) and, optionally,
``nodule_mask`` (an instance mask on the CT's grid), ``labels`` (a phantom-style JSON with
``nodules[].malignancy``) and ``malignancy`` (0/1, the study-level label; it wins over ``labels``).
The older training layout is read the same way: a column ``image`` instead of ``path``, and
``study_id`` optional (the image's file name then).

``read_manifest`` (batch) takes any study with an image, a folder is scanned for NIfTI files and DICOM
series, and study ids must be unique (they name output folders). ``find_studies`` (train, evaluate,
audit) needs a ``nodule_mask`` and ``labels`` in every row, and a folder is a folder of phantoms as
``make-phantom`` writes them (``<name>.nii.gz``, ``<name>_nodules.nii.gz``, ``<name>.json``); there the
labels JSON is read when the study is loaded, so a broken one is that study's error.

Everything is checked before anything is written: a missing column, a missing file, an empty or
duplicate ``study_id`` or an unreadable label raises :class:`MedvitInputError` with one line.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import MedvitInputError
from ..vocabulary import VOLUME_SUFFIXES

__all__ = ["Study", "find_phantoms", "find_studies", "malignancy_from_labels", "read_manifest"]

REQUIRED_COLUMNS = ("study_id", "path")
OPTIONAL_COLUMNS = ("nodule_mask", "labels", "malignancy")
LEGACY_IMAGE_COLUMN = "image"  # the older training manifests' name for ``path``
LABELLED_COLUMNS = ("nodule_mask", "labels")  # what train / evaluate / audit need in every row
MASK_SUFFIXES = ("_nodules", "_lungs")  # phantom masks next to a CT are not studies
RESERVED_IDS = ("audit",)  # DIR/audit/ holds the whole-set audit report
_STUDY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


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


def read_manifest(source: str | os.PathLike) -> list[Study]:
    """The studies of a manifest CSV or of a folder (see the module docstring); raises MedvitInputError."""
    source = Path(source)
    if not source.exists():
        raise MedvitInputError(f"manifest not found: {source} (expected a CSV with study_id,path or a folder)")
    studies = _scan_folder(source) if source.is_dir() else _read_csv(source)
    if not studies:
        raise MedvitInputError(f"manifest {source} lists no study")
    seen: set[str] = set()
    for study in studies:
        if study.study_id.lower() in RESERVED_IDS:
            raise MedvitInputError(
                f"manifest {source}: study_id {study.study_id!r} is reserved (the folder of the "
                "audit report); rename that study"
            )
        if study.study_id in seen:
            raise MedvitInputError(f"manifest {source}: duplicate study_id {study.study_id!r}")
        seen.add(study.study_id)
    return studies


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


def _read_csv(path: Path, labelled: bool = False) -> list[Study]:
    columns, rows = _read_rows(path)
    image_column = _check_columns(path, columns, labelled)
    base = path.parent
    studies = []
    for line, row in enumerate(rows, start=2):
        where = f"manifest {path} line {line}"
        image = _existing(base, row.get(image_column, ""), where, image_column, required=True)
        study_id = _row_id(row, image_column, where)
        mask = _existing(base, row.get("nodule_mask", ""), where, "nodule_mask", required=labelled)
        labels = _existing(base, row.get("labels", ""), where, "labels", required=labelled)
        malignancy = _malignancy_value(row.get("malignancy", ""), where)
        if malignancy is None and labels is not None and not labelled:
            malignancy = malignancy_from_labels(labels, where)
        studies.append(Study(study_id, image, mask, labels, malignancy))
    return studies


def _row_id(row: dict[str, str], image_column: str, where: str) -> str:
    """The row's ``study_id``; in the older layout without one, the image's file name."""
    study_id = row.get("study_id", "")
    if not study_id and image_column == LEGACY_IMAGE_COLUMN:
        name = Path(row[image_column]).name
        return name if _STUDY_ID.match(name) else _safe_id(name)
    if not _STUDY_ID.match(study_id):
        raise MedvitInputError(
            f"{where}: expected a study_id of letters, digits, '.', '_' or '-' "
            f"(not starting with '.'), got {study_id!r}"
        )
    return study_id


def _existing(base: Path, value: str, where: str, column: str, required: bool = False) -> str | None:
    if not value:
        if required:
            raise MedvitInputError(f"{where}: empty {column}")
        return None
    p = Path(value).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.exists():
        raise MedvitInputError(f"{where}: {column} not found: {p}")
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
            f"{prefix}cannot read labels {labels} (expected JSON with nodules[].malignancy): "
            f"{type(exc).__name__}: {exc}"
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
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "study"
    return cleaned[:200]


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


def _scan_folder(root: Path) -> list[Study]:
    """Each image file (not a ``*_nodules``/``*_lungs`` mask) and each folder holding DICOM files is a study.

    The labels ``<name>.json`` and mask ``<name>_nodules.nii.gz`` beside an image (or beside a series
    folder ``<name>_dicom/``) are picked up. Study ids are the names; names that repeat in different
    sub-folders get their relative path (``a_b_name``) instead."""
    found = _walk_images(root)
    counts: dict[str, int] = {}
    for name, _, _ in found:
        counts[name] = counts.get(name, 0) + 1
    studies = []
    for name, rel_id, path in found:
        study_id = _safe_id(name if counts[name] == 1 else rel_id)
        base = name[: -len("_dicom")] if path.is_dir() and name.endswith("_dicom") else name
        labels = path.parent / f"{base}.json"
        mask = path.parent / f"{base}_nodules.nii.gz"
        labels_s = str(labels.resolve()) if labels.is_file() else None
        malignancy = malignancy_from_labels(labels_s, f"folder {root}") if labels_s else None
        studies.append(
            Study(study_id, str(path.resolve()), str(mask.resolve()) if mask.is_file() else None, labels_s, malignancy)
        )
    if not studies:
        raise MedvitInputError(f"no study in folder {root}: expected NIfTI/NRRD/MHA files or DICOM series folders")
    return studies
