"""A resumable batch job: which studies are left, the engine that runs them, the records it leaves.

The driver (this module) owns every record: an engine hands it one outcome per study, and the driver
writes ``.done.json`` (after checking the outputs are there) or ``.failed.json``, then rewrites
``results.csv`` and ``batch.json`` from what it knows. A ``kill -9`` at any moment leaves either a
complete study with its record, or a study without a record that the next run redoes from scratch.
A study whose input changed since its record (another file, or the same file rewritten; see
:func:`.records.input_identity`) is redone too.

Before anything is written the manifest, the model, the targets and ``--out`` are checked (a study id that
is not a safe folder name, a symbolic link where the job writes); afterwards an ``OSError`` writing the
job's own files (a full disk, a read-only folder) ends the job with one :class:`OutputError` line.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MedvitInputError, OutputError, os_error_message, printable
from ..io.writer import atomic_path
from .manifest import Study, read_manifest
from .records import (
    AUDIT_NAME,
    DONE_NAME,
    FAILED_NAME,
    JOB_NAME,
    LOCK_NAME,
    RESULTS_NAME,
    check_no_links,
    input_changed,
    input_identity,
    now_iso,
    read_done,
    read_failed,
    read_json,
    real_folder,
    result_row,
    write_done,
    write_failed,
    write_json_atomic,
    write_results,
)
from .study import BatchSettings, OutputSpec, output_spec

ENGINES = ("local", "ray")
WRITE_EVERY_S = 1.0  # results.csv / batch.json are rewritten at most this often (and always at the end)


@dataclass
class BatchSummary:
    """What a run did: counts over the whole manifest and over this run."""

    total: int
    done: int
    failed: int
    skipped: int  # already done before this run
    ran: int
    elapsed_s: float
    studies_per_min: float | None
    out_dir: Path
    results_csv: Path
    audit: Path | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (study_id, error)
    changed: int = 0  # run again because their input changed since their record


def check_out_dir(out_dir: str | os.PathLike, study_ids: Sequence[str] = ()) -> Path:
    """``out_dir`` as a folder that is new, empty or an earlier batch's output, where none of the job's
    files and none of the folders of ``study_ids`` is a symbolic link (else MedvitInputError)."""
    out = Path(out_dir)
    try:
        if out.exists() and not out.is_dir():
            raise OutputError(f"--out {printable(out)} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not (out / JOB_NAME).is_file():
            raise OutputError(
                f"--out {printable(out)} is not empty and holds no {JOB_NAME}; choose a new folder or the "
                "output folder of an earlier batch to resume it"
            )
        if out.is_dir():
            check_no_links(out, list(study_ids))
    except OSError as exc:
        raise OutputError("cannot read --out " + os_error_message(exc)) from None
    return out


@contextlib.contextmanager
def job_lock(out: Path) -> Iterator[None]:
    """One job per output folder at a time (the lock goes with the process, even on ``kill -9``).

    ``.lock`` is opened without following a symbolic link and without truncating it: a link planted there
    would otherwise have its target (anywhere on the disk) emptied."""
    path = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(
                f"{printable(path)} is a symbolic link; a batch does not follow links in --out; remove it"
            ) from None
        raise OutputError("cannot write to " + os_error_message(exc)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputError(f"{printable(path)} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MedvitInputError(
                f"another batch job is writing to {printable(out)}; wait for it or choose another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class BatchJob:
    """The state of one output folder over a manifest: statuses, records, progress and result files."""

    def __init__(
        self,
        out: Path,
        studies: Sequence[Study],
        spec: OutputSpec,
        settings: BatchSettings,
        manifest: str,
        engine: str,
        log: Callable[[str], None],
    ):
        self.out, self.studies, self.spec, self.settings = out, list(studies), spec, settings
        self.manifest, self.engine, self.log = manifest, engine, log
        self.fingerprint = spec.fingerprint()
        self.status: dict[str, str] = {}
        self.records: dict[str, dict | None] = {}
        self.skipped = 0
        self.changed = 0
        self.ran = 0
        self.started = time.perf_counter()
        self.started_at = now_iso()
        self._last_write = 0.0

    # ------------------------------------------------------------------ state on disk
    def scan(self, retry_failed: bool) -> list[Study]:
        """Statuses from the records on disk; returns the studies to run (in manifest order).

        A done or failed record made from another input than the study's (see
        :func:`.records.input_identity`) is stale: the study runs again and counts in ``changed``."""
        todo = []
        for study in self.studies:
            study_dir = self.out / study.study_id
            done = read_done(study_dir, self.fingerprint)
            failed = read_failed(study_dir) if done is None else None
            mask = study.nodule_mask if self.settings.roi_from_mask else None
            changed = (done or failed) is not None and input_changed(done or failed, input_identity(study.path, mask))
            if done is not None and not changed:
                self.status[study.study_id], self.records[study.study_id] = "done", done
                self.skipped += 1
            elif failed is not None and not changed and not retry_failed:
                self.status[study.study_id], self.records[study.study_id] = "failed", failed
            else:
                self.status[study.study_id], self.records[study.study_id] = "pending", None
                self.changed += changed
                todo.append(study)
        for name in (RESULTS_NAME, JOB_NAME):  # temporaries of a write that a kill interrupted
            for stale in self.out.glob(f".{name}.*"):
                if stale.is_file() or stale.is_symlink():
                    stale.unlink(missing_ok=True)
        return todo

    def plan_line(self, n_todo: int) -> str:
        """What this run will do, after :meth:`scan`."""
        counts = self.counts()
        failed = f"{counts['failed']} failed before (kept; --retry-failed retries them), " if counts["failed"] else ""
        changed = ""
        if self.changed:
            whose = "its" if self.changed == 1 else "their"
            changed = f" ({self.changed} of them because {whose} input changed since the last run)"
        return (
            f"{counts['total']} studies: {self.skipped} already done, {failed}"
            f"{n_todo} to run with the {self.engine} engine{changed}"
        )

    def counts(self) -> dict[str, int]:
        values = list(self.status.values())
        return {
            "total": len(values),
            "done": values.count("done"),
            "failed": values.count("failed"),
            "pending": values.count("pending"),
        }

    def rate(self) -> tuple[float | None, float | None]:
        """(studies per minute in this run, seconds left) from the studies processed so far."""
        elapsed = time.perf_counter() - self.started
        if self.ran == 0 or elapsed <= 0:
            return None, None
        per_min = 60.0 * self.ran / elapsed
        return per_min, self.counts()["pending"] * 60.0 / per_min

    def write_files(self, state: str, force: bool = False) -> None:
        if not force and time.perf_counter() - self._last_write < WRITE_EVERY_S:
            return
        rows = [result_row(s, self.out, self.status[s.study_id], self.records[s.study_id]) for s in self.studies]
        write_results(self.out, rows)
        per_min, eta = self.rate()
        write_json_atomic(
            self.out / JOB_NAME,
            {
                "tool": "medvit-explain batch",
                "state": state,
                "manifest": self.manifest,
                "engine": self.engine,
                "started_at": self.started_at,
                "updated_at": now_iso(),
                "progress": {
                    **self.counts(),
                    "skipped_done": self.skipped,
                    "processed_this_run": self.ran,
                    "studies_per_min": None if per_min is None else round(per_min, 3),
                    "eta_s": None if eta is None else round(eta, 1),
                },
                "settings": self.settings.to_dict(),
                "outputs_spec": {**vars(self.spec)},
                "settings_fingerprint": self.fingerprint,
            },
        )
        self._last_write = time.perf_counter()

    # ------------------------------------------------------------------ one outcome from an engine
    def on_result(self, outcome: dict[str, Any]) -> None:
        study_id = outcome["study_id"]
        study_dir = self.out / study_id
        fields = {k: v for k, v in outcome.items() if k != "status"}
        fields["settings_fingerprint"] = self.fingerprint
        status = outcome["status"]
        if status == "done":
            try:
                write_done(study_dir, {**fields, "outputs_spec": {**vars(self.spec)}})
            except (RuntimeError, OSError) as exc:  # e.g. a Ray worker wrote to a folder this node cannot see
                status = "failed"
                fields = {**fields, "error": f"outputs not found by the driver: {exc}"}
        if status == "failed":
            write_failed(study_dir, fields)
        self.status[study_id], self.records[study_id] = (
            status,
            read_json(study_dir / (DONE_NAME if status == "done" else FAILED_NAME)),
        )
        self.ran += 1
        counts = self.counts()
        per_min, eta = self.rate()
        finished = counts["done"] + counts["failed"]
        took = (outcome.get("timings_s") or {}).get("total")
        what = "done" if status == "done" else f"FAILED: {printable(fields.get('error', ''))}"
        rate = "?" if per_min is None else f"{per_min:.1f}"
        self.log(
            f"[{finished:>{len(str(counts['total']))}}/{counts['total']}] {study_id} {what}"
            f"{'' if took is None else f' ({took:.1f} s)'} | {rate} studies/min | ETA {format_eta(eta)}"
        )
        self.write_files("running")


def run_batch(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: BatchSettings | None = None,
    *,
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    retry_failed: bool = False,
    audit: bool = True,
    log: Callable[[str], None] = print,
) -> BatchSummary:
    """Explain every study of ``manifest`` into ``out_dir/<study_id>/``; resumable (see the module docs).

    Everything a user can get wrong (manifest, model, targets, ``out_dir``) is checked before anything is
    written; it raises :class:`MedvitInputError`. A study's own failure is recorded, not raised.
    With ``audit`` (default) and labelled studies, the whole-set audit report goes to ``out_dir/audit/``
    once every study has run.
    """
    from ..model import load_model

    audit_enabled = audit
    settings = settings or BatchSettings()
    if engine not in ENGINES:
        raise MedvitInputError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    studies = read_manifest(manifest)
    out = check_out_dir(out_dir, [s.study_id for s in studies])
    if engine == "ray":
        from .ray_engine import import_ray

        import_ray()
    # the driver's model checks the checkpoint and targets up front (the Ray workers load their own)
    model = load_model(
        settings.model_path, device=settings.device if engine == "local" else "cpu", config=settings.model_config
    )
    spec = output_spec(model, settings)
    ray_options = {"address": ray_address, "workers": workers, "gpus_per_worker": gpus_per_worker}
    job = BatchJob(out, studies, spec, settings, str(manifest), engine, log)
    audit = None
    try:
        with job_lock(out):
            todo = job.scan(retry_failed)
            log(job.plan_line(len(todo)))
            job.write_files("running", force=True)
            state = "interrupted"
            job.started = time.perf_counter()  # the rate counts this run's work, engine start-up included
            try:
                _run_engine(engine, model, settings, out, todo, job, ray_options, log)
                state = "finished"
            finally:
                job.write_files(state, force=True)
            if audit_enabled and job.counts()["pending"] == 0:
                audit = audit_whole_set(out, studies, job, model, settings, log)
    except OSError as exc:  # the job's own files (records, tables, audit) could not be written
        raise OutputError(f"cannot write the batch output in --out {printable(out)}: {os_error_message(exc)}") from exc
    return _summary(job, studies, out, audit)


def _run_engine(engine: str, model, settings: BatchSettings, out: Path, todo, job, ray_options: dict, log) -> None:
    """The studies ``todo`` through the local engine (this process) or the Ray engine."""
    if engine == "local":
        from .local import run_local

        run_local(model, settings, out, todo, job.on_result)
    else:
        from .ray_engine import run_ray

        run_ray(settings, out, todo, job.on_result, log=log, **ray_options)


def _summary(job, studies, out: Path, audit) -> BatchSummary:
    counts = job.counts()
    per_min, _ = job.rate()
    failures = [
        (s.study_id, (job.records[s.study_id] or {}).get("error", ""))
        for s in studies
        if job.status[s.study_id] == "failed"
    ]
    return BatchSummary(
        total=counts["total"],
        done=counts["done"],
        failed=counts["failed"],
        skipped=job.skipped,
        ran=job.ran,
        elapsed_s=time.perf_counter() - job.started,
        studies_per_min=per_min,
        out_dir=out,
        results_csv=out / RESULTS_NAME,
        audit=audit,
        failures=failures,
        changed=job.changed,
    )


def audit_whole_set(
    out: Path, studies: Sequence[Study], job: BatchJob, model, settings: BatchSettings, log: Callable[[str], None]
) -> Path | None:
    """The whole-set ``audit`` report (:mod:`medvit_explain.audit`) in ``out/audit/``, over the done studies
    that have a labels JSON and a nodule mask; None when there are none (or nothing changed since the
    last audit, whose report is then kept).

    The audit scores and explains each study again (its API takes studies, not batch outputs) for the
    malignancy target with the batch's methods, so it costs about one more pass over the labelled set;
    ``--no-audit`` skips it. Studies with only a ``malignancy`` column are not audited (results.csv has
    ``malignancy_label`` beside ``max_malignancy_prob`` for them)."""
    labelled = [s for s in studies if job.status[s.study_id] == "done" and s.labels and s.nodule_mask]
    if not labelled:
        if any(s.malignancy is not None for s in studies):
            log("audit skipped: it needs a labels JSON and a nodule_mask per study")
        return None
    from ..report.evaluation import write_audit as write_audit_files
    from ..workflows.audit import audit as run_audit

    audit_dir = out / AUDIT_NAME
    stamp = hashlib.sha256(
        json.dumps(
            [
                [s.study_id, s.path, s.labels, s.nodule_mask, (job.records[s.study_id] or {}).get("finished_at")]
                for s in labelled
            ]
            + [list(settings.methods), job.fingerprint]
        ).encode()
    ).hexdigest()
    previous = read_json(audit_dir / DONE_NAME)
    if previous and previous.get("stamp") == stamp and (audit_dir / "audit.html").is_file():
        log(f"audit: unchanged since the last run ({audit_dir / 'audit.html'})")
        return audit_dir / "audit.html"
    real_folder(audit_dir)
    (audit_dir / DONE_NAME).unlink(missing_ok=True)
    manifest = audit_dir / "studies.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["study_id", "image", "nodule_mask", "labels"])
    writer.writerows([s.study_id, s.path, s.nodule_mask, s.labels] for s in labelled)
    with atomic_path(manifest) as tmp:
        Path(tmp).write_text(buffer.getvalue())
    log(f"audit: {len(labelled)} labelled studies")
    try:
        result = run_audit(
            model,
            str(manifest),
            methods=list(settings.methods),
            batch_size=settings.batch_size,
            progress=False,
            on_failure=lambda name, message: log(f"audit: {printable(name)} failed: {printable(message)}"),
        )
    except MedvitInputError as exc:
        log(f"audit skipped: {printable(exc)}")
        return None
    written = write_audit_files(result, audit_dir)
    write_json_atomic(audit_dir / DONE_NAME, {"stamp": stamp, "studies": len(labelled), "finished_at": now_iso()})
    return written["report"]
