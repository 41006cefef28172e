"""What a batch job leaves on disk, and how a re-run reads it back.

``DIR/<study_id>/.done.json``   completion record, written last and atomically, only after every output
                                exists: the outputs (name, bytes, sha256), timings, summary, settings and
                                the input's identity (:func:`input_identity`).
``DIR/<study_id>/.failed.json`` the error of a study that failed (removed when it later succeeds).
``DIR/results.csv``             one row per manifest study, rebuilt from the records (atomic rewrite).
``DIR/batch.json``              the job's settings and its progress (count, rate, ETA), rewritten as it goes;
                                it also marks ``DIR`` as a batch output folder.
``DIR/.lock``                   held (``flock``) by the running job.
``DIR/audit/``                  the whole-set audit report.

These names (:data:`JOB_FILES`) are no study's id. A study is *done* when its record parses, was made
with the same output-changing settings from the same input (path, size, modification time), and every
file it lists exists with the recorded size. Anything else (no record, a stale or damaged record, a
changed input, a missing or truncated file) means the study is redone from scratch.

Nothing outside ``DIR`` is written or deleted: a study folder, ``audit/`` or ``.lock`` that is a symbolic
link is refused (:func:`real_folder`, :func:`check_no_links`), the records and tables are written to a
temporary file and renamed (a link at the final name is replaced, not followed).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from ..errors import OutputError, printable
from ..io.writer import atomic_path
from ..workflows.studies import Study

RECORD_VERSION = 1
DONE_NAME = ".done.json"
FAILED_NAME = ".failed.json"
RESULTS_NAME = "results.csv"
JOB_NAME = "batch.json"
LOCK_NAME = ".lock"
AUDIT_NAME = "audit"
JOB_FILES = (RESULTS_NAME, JOB_NAME, LOCK_NAME, AUDIT_NAME)  # what the job writes at the top of DIR
RESULT_COLUMNS = [
    "study_id",
    "status",
    "path",
    "malignancy_label",
    "max_malignancy_prob",
    "max_malignancy_slice",
    "max_malignancy_roi",
    "mode",
    "n_rows",
    "load_s",
    "explain_s",
    "write_s",
    "total_s",
    "device",
    "worker",
    "finished_at",
    "output_dir",
    "error",
]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as stream:
            json.dump(data, stream, indent=2)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())  # the record must not survive a crash while its bytes do not
    return path


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def input_identity(path: str | os.PathLike, mask: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a completion record remembers of a study's input, to redo the study when the input changes.

    A file: its resolved path, size and ``st_mtime_ns`` (with an ``.mhd``/``.nhdr`` header, also its data
    files ``<stem>.*`` beside it). A folder (a DICOM series, read recursively): its resolved path, the count
    and total size of its files and a SHA-256 over the sorted ``(name, size, mtime_ns)`` of each. ``mask``
    (the nodule mask, when the outputs depend on it) is added the same way. A missing path is recorded as
    missing, so a later file there counts as a change.

    Why not a checksum of the contents: a resume would then read every input of the job again (gigabytes
    of CT) before knowing what to skip. Size and a nanosecond modification time are what ``make`` and
    ``rsync`` trust: replacing, rewriting or re-exporting a scan changes them. The inode is left out on
    purpose: a restore from a backup or a copy of the inputs to another disk keeps the contents but not
    the inode, and would redo the whole job.
    """
    identity = _path_identity(Path(path))
    if mask is not None:
        identity["nodule_mask"] = _path_identity(Path(mask))
    return identity


def _path_identity(path: Path) -> dict[str, Any]:
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # a symbolic-link loop: the study fails when it is read
        return {"path": os.path.abspath(path), "missing": True}
    try:
        info = os.stat(resolved)
    except OSError:
        return {"path": str(resolved), "missing": True}
    if not stat.S_ISDIR(info.st_mode):
        identity: dict[str, Any] = {"path": str(resolved), "bytes": info.st_size, "mtime_ns": info.st_mtime_ns}
        if resolved.suffix.lower() in (".mhd", ".nhdr"):  # the voxels are in a separate data file
            pattern = glob.escape(str(resolved.with_suffix(""))) + ".*"
            identity["data_files"] = _files_identity([Path(p) for p in sorted(glob.glob(pattern))], resolved.parent)
        return identity
    files = []
    for folder, dirs, names in os.walk(resolved):
        dirs.sort()
        files += [Path(folder) / name for name in sorted(names)]
    return {"path": str(resolved), **_files_identity(files, resolved)}


def _files_identity(files: list[Path], root: Path) -> dict[str, Any]:
    listing = []
    for file in files:
        try:
            info = os.stat(file)
        except OSError:  # a dangling link or a file removed meanwhile
            continue
        listing.append((file.relative_to(root).as_posix(), info.st_size, info.st_mtime_ns))
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"files": len(listing), "bytes": sum(size for _, size, _ in listing), "sha256": digest}


def input_changed(record: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether ``record`` was made from another input than ``identity``. A record without an identity
    (written before records had one) counts as changed: redoing a study costs time, keeping numbers that
    may belong to another scan costs correctness."""
    return record.get("input") != identity


def file_digest(path: Path, sync: bool = False) -> str:
    """SHA-256 of a file; with ``sync`` its data is also flushed to disk (before a record points at it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
        if sync:
            os.fsync(stream.fileno())
    return digest.hexdigest()


def list_outputs(study_dir: Path) -> list[dict[str, Any]]:
    """Every file under ``study_dir`` (record files excluded), with its size and SHA-256, sorted by name;
    each file is flushed to disk, so a record written afterwards never outlives its outputs' data."""
    out = []
    for p in sorted(study_dir.rglob("*")):
        if p.is_file() and p.name not in (DONE_NAME, FAILED_NAME) and not p.name.startswith("."):
            out.append(
                {
                    "name": p.relative_to(study_dir).as_posix(),
                    "bytes": p.stat().st_size,
                    "sha256": file_digest(p, sync=True),
                }
            )
    return out


def real_folder(path: Path) -> Path:
    """``path`` as a real folder, created if missing; OutputError if it is a symbolic link (whose target
    lies anywhere: writing or deleting through it would touch files outside the output folder) or a file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        path.mkdir(parents=True, exist_ok=True)
        info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise OutputError(
            f"{printable(path)} is a symbolic link (to {printable(os.readlink(path))}); a batch writes only "
            "into real folders under --out; remove the link"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise OutputError(f"{printable(path)} is in the way: a file where the batch writes a folder; move it")
    return path


def check_no_links(out: Path, study_ids: list[str]) -> None:
    """Before anything is written: OutputError if one of the job's files or study folders under ``out`` is
    a symbolic link (planted there, it would send the job's writes and deletions elsewhere), or if a file
    stands where a study's folder goes."""
    for name in (*JOB_FILES, *study_ids):
        path = out / name
        if path.is_symlink():
            raise OutputError(
                f"--out {printable(out)}: {name} is a symbolic link (to {printable(os.readlink(path))}); a batch "
                "writes only inside --out and does not follow links there; remove the link or choose another --out"
            )
    for study_id in study_ids:
        if (out / study_id).exists() and not (out / study_id).is_dir():
            raise OutputError(
                f"--out {printable(out)}: {study_id} is a file where that study's folder goes; move it or "
                "choose another --out"
            )


def clear_study_dir(study_dir: Path) -> None:
    """Empty a study's folder for a fresh run: the stale record goes first, then everything else. A link
    inside is removed, never followed; the folder itself must be a real folder (:func:`real_folder`)."""
    real_folder(study_dir)
    for name in (DONE_NAME, FAILED_NAME):
        (study_dir / name).unlink(missing_ok=True)
    for p in study_dir.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def outputs_intact(study_dir: Path, outputs: list[dict[str, Any]]) -> str | None:
    """None when every listed output exists with its recorded size, else what is wrong."""
    if not outputs:
        return "the record lists no output"
    for item in outputs:
        p = study_dir / item["name"]
        if not p.is_file():
            return f"{item['name']} is missing"
        if p.stat().st_size != item["bytes"]:
            return f"{item['name']} has {p.stat().st_size} bytes, the record says {item['bytes']}"
    return None


def read_done(study_dir: Path, fingerprint: str) -> dict | None:
    """The study's completion record if the study is done with these settings, else None."""
    record = read_json(study_dir / DONE_NAME)
    if not record or record.get("version") != RECORD_VERSION or record.get("settings_fingerprint") != fingerprint:
        return None
    try:
        if outputs_intact(study_dir, record["outputs"]) is not None:
            return None
    except (KeyError, TypeError):
        return None
    return record


def read_failed(study_dir: Path) -> dict | None:
    return read_json(study_dir / FAILED_NAME)


def write_done(study_dir: Path, record: dict[str, Any]) -> Path:
    """Write the completion record (after checking the outputs it lists are there), then drop any failure."""
    real_folder(study_dir)
    problem = outputs_intact(study_dir, record["outputs"])
    if problem is not None:
        raise RuntimeError(f"refusing to mark {study_dir.name} done: {problem}")
    path = write_json_atomic(study_dir / DONE_NAME, {"version": RECORD_VERSION, **record})
    (study_dir / FAILED_NAME).unlink(missing_ok=True)
    return path


def write_failed(study_dir: Path, record: dict[str, Any]) -> Path:
    real_folder(study_dir)
    (study_dir / DONE_NAME).unlink(missing_ok=True)
    return write_json_atomic(study_dir / FAILED_NAME, {"version": RECORD_VERSION, **record})


def result_row(study: Study, out_dir: Path, status: str, record: dict | None) -> dict[str, Any]:
    """One row of results.csv from a study and its record (done, failed or none yet)."""
    row: dict[str, Any] = {
        "study_id": study.study_id,
        "status": status,
        "path": study.path,
        "malignancy_label": "" if study.malignancy is None else study.malignancy,
    }
    if record:
        summary = record.get("summary") or {}
        timings = record.get("timings_s") or {}
        row.update(
            {
                "max_malignancy_prob": summary.get("max_malignancy_prob", ""),
                "max_malignancy_slice": summary.get("max_malignancy_slice", ""),
                "max_malignancy_roi": summary.get("max_malignancy_roi", ""),
                "mode": summary.get("mode", ""),
                "n_rows": summary.get("n_rows", ""),
                "load_s": timings.get("load", ""),
                "explain_s": timings.get("explain", ""),
                "write_s": timings.get("write", ""),
                "total_s": timings.get("total", ""),
                "device": record.get("device", ""),
                "worker": record.get("worker", ""),
                "finished_at": record.get("finished_at", ""),
                "error": record.get("error", ""),
            }
        )
    if status == "done":
        row["output_dir"] = study.study_id
    return row


def write_results(out_dir: Path, rows: list[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    path = out_dir / RESULTS_NAME
    with atomic_path(path) as tmp:
        Path(tmp).write_text(buffer.getvalue())
    return path
