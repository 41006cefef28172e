"""Manifests, output folders and hostile files for ``medvit-explain batch`` (the cases of test_batch_inputs)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .files import nifti, tiny_ct

# a study_id that may not name an output folder, by what is wrong with it
BAD_IDS = {
    "results.csv": "results.csv",  # the job's own table
    "batch.json": "batch.json",  # the job's own record
    "audit": "audit",  # the folder of the whole-set audit
    "audit in capitals": "AUDIT",  # the same folder on a case-insensitive file system
    "lock": ".lock",
    "empty": "",
    "dot": ".",
    "dot-dot": "..",
    "parent path": "../escape",
    "slash": "a/b",
    "backslash": "a\\b",
    "NUL": "a\x00b",
    "escape sequence": "a\x1b[2Jb",
    "new line": "a\nb",
    "hidden": ".hidden",
    "too long": "x" * 129,
}


def batch_options(checkpoint: Path, *extra: str, audit: bool = False) -> list[str]:
    """The fastest batch run: one method, one target, CPU, no report, no audit (unless ``audit``)."""
    return [
        "--model",
        str(checkpoint),
        "--method",
        "cdam",
        "--target",
        "malignancy",
        "--device",
        "cpu",
        "--no-report",
        *([] if audit else ["--no-audit"]),
        *extra,
    ]


def write_manifest(path: Path, rows: list[tuple[str, str]], columns: tuple[str, ...] = ("study_id", "path")) -> Path:
    """A manifest CSV with ``rows`` of (study_id, path)."""
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def scans(folder: Path, names: tuple[str, ...] = ("a", "b"), seed: int = 0) -> dict[str, Path]:
    """One tiny CT per name in ``folder`` (``<name>.nii.gz``), each a different noise seed."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: nifti(folder, f"{name}.nii.gz", tiny_ct(seed=seed + i)) for i, name in enumerate(names)}


def other_scan(path: Path) -> Path:
    """A CT clearly unlike :func:`tiny_ct` (a shifted, brighter body) at ``path``: other predictions."""
    volume = tiny_ct(seed=7)
    volume.array[...] = volume.array[::-1, ::-1] + 300.0
    return nifti(path.parent, path.name, volume)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (links not followed) by relative path, with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            out[path.relative_to(folder).as_posix()] = b"<link>" if path.is_symlink() else path.read_bytes()
    return out


def victim_folder(folder: Path, study_id: str) -> Path:
    """A folder outside --out holding files a batch would write or delete if it followed a link to it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "precious.txt").write_text("not the batch's to delete\n")
    (folder / f"{study_id}_cdam_malignancy.nii.gz").write_bytes(b"someone else's file")
    (folder / ".done.json").write_text('{"not": "a record of this job"}\n')
    return folder
