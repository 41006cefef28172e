"""What a batch job leaves on disk, and how a re-run reads it back.

``DIR/<study_id>/.done.json``   completion record, written last and atomically, only after every output
                                exists: the outputs (name, bytes, sha256), timings, summary, settings.
``DIR/<study_id>/.failed.json`` the error of a study that failed (removed when it later succeeds).
``DIR/results.csv``             one row per manifest study, rebuilt from the records (atomic rewrite).
``DIR/batch.json``              the job's settings and its progress (count, rate, ETA), rewritten as it goes;
                                it also marks ``DIR`` as a batch output folder.

A study is *done* when its record parses, was made with the same output-changing settings, and every file
it lists exists with the recorded size. Anything else (no record, a stale or damaged record, a missing or
truncated file) means the study is redone from scratch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..io.writer import atomic_path
from .manifest import Study

RECORD_VERSION = 1
DONE_NAME = ".done.json"
FAILED_NAME = ".failed.json"
RESULTS_NAME = "results.csv"
JOB_NAME = "batch.json"
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


def clear_study_dir(study_dir: Path) -> None:
    """Empty a study's folder for a fresh run: the stale record goes first, then everything else."""
    for name in (DONE_NAME, FAILED_NAME):
        (study_dir / name).unlink(missing_ok=True)
    if study_dir.is_dir():
        for p in study_dir.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    study_dir.mkdir(parents=True, exist_ok=True)


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
    problem = outputs_intact(study_dir, record["outputs"])
    if problem is not None:
        raise RuntimeError(f"refusing to mark {study_dir.name} done: {problem}")
    path = write_json_atomic(study_dir / DONE_NAME, {"version": RECORD_VERSION, **record})
    (study_dir / FAILED_NAME).unlink(missing_ok=True)
    return path


def write_failed(study_dir: Path, record: dict[str, Any]) -> Path:
    study_dir.mkdir(parents=True, exist_ok=True)
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
