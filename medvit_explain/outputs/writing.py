"""Write one explained study's files: overlays in parallel, then the table, DICOM, report and summary.

Each overlay is projected onto the source grid, quantised and compressed by one worker thread, one
(method, target) at a time per worker: memory holds the CT plus ``workers`` full-size maps, whatever
the number of methods and targets.

All or nothing: every file is written into a hidden staging folder inside the output folder
(``.medvit-explain-run-<pid>-XXXX``) and moved to its final name only when all of them are complete,
so a failed run (a full disk, a quota, an error in the DICOM writer) leaves no new file at a final path
and no half-written study. A killed run's staging folder is removed by the next run into that folder.
Files of an earlier run that are replaced are named in one warning.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from ..errors import MedvitWarning, OutputError, os_error_message
from ..io.nifti import write_map
from ..io.writer import atomic_path, remove_leftovers, replace_folder
from ..vocabulary import DEFAULT_MAP_DTYPE, MAP_DTYPES, to_json
from .layout import DICOM_FOLDER, PREDICTIONS, REPORT, SUMMARY, overlay_name, volume_stem

__all__ = ["MAX_WORKERS", "output_folder", "overlay_workers", "write_outputs"]

MAX_WORKERS = 4  # each in-flight overlay holds one float32 map on the source grid
STAGE_PREFIX = ".medvit-explain-run-"


@contextlib.contextmanager
def output_folder(out_dir: str | os.PathLike):
    """Create ``out_dir`` (and missing parents) and check a file can be made in it, before any work is done;
    if the block raises, the folders this created are removed again (when still empty). Raises
    :class:`~medvit_explain.errors.OutputError` (one line) when the folder cannot be written."""
    out_dir = Path(out_dir)
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputError(f"--out {out_dir} exists and is not a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        _remove_empty(created)
        raise OutputError("cannot write to " + os_error_message(exc, out_dir)) from None
    try:
        yield out_dir
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        with contextlib.suppress(OSError):
            folder.rmdir()


def _remove_stale_stages(out_dir: Path) -> None:
    """Remove the staging folders of runs that were killed (their process is gone)."""
    for stage in out_dir.glob(f"{STAGE_PREFIX}*"):
        pid = stage.name[len(STAGE_PREFIX) :].split("-")[0]
        if stage.is_dir() and not stage.is_symlink() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stage, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(stage: Path, out_dir: Path, written: dict[str, Path]) -> dict[str, Path]:
    """Move every staged file (and the ``dicom`` folder) to its final name in ``out_dir``; warn once about
    files of an earlier run that were replaced."""
    names = sorted({p.relative_to(stage).parts[0] for p in written.values()})
    replaced = [n for n in names if (out_dir / n).exists() or (out_dir / n).is_symlink()]
    for name in names:
        if (stage / name).is_dir():
            replace_folder(stage / name, out_dir / name)
        else:
            if (out_dir / name).is_dir() and not (out_dir / name).is_symlink():
                raise OutputError(f"a folder is in the way of {out_dir / name}; move it or choose another --out")
            os.replace(stage / name, out_dir / name)
    if replaced:
        shown = ", ".join(replaced[:3]) + (f" and {len(replaced) - 3} more" if len(replaced) > 3 else "")
        warnings.warn(f"replaced {len(replaced)} earlier output(s) in {out_dir}: {shown}", MedvitWarning, stacklevel=3)
    return {key: out_dir / path.relative_to(stage) for key, path in written.items()}


def overlay_workers(n_maps: int) -> int:
    """Overlays written at once: one per core, at most ``MAX_WORKERS``, at most one per map."""
    return max(1, min(n_maps, os.cpu_count() or 1, MAX_WORKERS))


def write_outputs(
    result,
    out_dir: str | os.PathLike,
    *,
    stem: str | None = None,
    map_dtype: str = DEFAULT_MAP_DTYPE,
    report: bool = True,
    dicom: bool = False,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Path]:
    """Write overlays, ``predictions.csv``, ``summary.json`` (and ``report.html``, DICOM) into ``out_dir``.

    Args:
        result: an :class:`~medvit_explain.pipeline.ExplainResult`.
        out_dir: the output folder (created if needed).
        stem: file-name prefix (default: the input's, see :func:`~medvit_explain.outputs.volume_stem`).
        map_dtype: ``"int16"`` (compact, NIfTI ``scl_slope``; default) or ``"float32"`` (exact values),
            for the overlays and the DICOM Parametric Maps.
        report: also write ``report.html``.
        dicom: also write DICOM Parametric Maps into ``dicom/`` (DICOM input only).
        workers: overlays written at once (default: :func:`overlay_workers`).
        progress: called with 1 after each overlay is written.

    Returns:
        ``{"<method>/<target>": overlay, "predictions": ..., "summary": ..., "report": ..., "dicom": ...}``.
    """
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"expected a map dtype among {', '.join(MAP_DTYPES)}, got {map_dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or volume_stem(result.volume.metadata.get("path", "volume"))
    finals = [overlay_name(stem, m, t) for m in result.methods for t in result.targets]
    remove_leftovers([out_dir / name for name in (*finals, PREDICTIONS, REPORT, SUMMARY)])
    _remove_stale_stages(out_dir)
    result.input_checksum()
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=out_dir))
        try:
            written = _write_staged(result, stage, stem, map_dtype, report, dicom, workers, progress)
            return _publish(stage, out_dir, written)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    except OSError as exc:
        raise OutputError(
            f"cannot write the outputs into {os_error_message(exc, out_dir)}; no output of this run was kept"
        ) from exc


def _write_staged(result, stage: Path, stem: str, map_dtype: str, report: bool, dicom: bool, workers, progress):
    """Every output file of ``result``, written into the staging folder ``stage``."""
    t0 = time.perf_counter()
    written = _write_overlays(result, stage, stem, map_dtype, workers, progress)
    written["predictions"] = stage / PREDICTIONS
    result.predictions.to_csv(written["predictions"])
    if dicom:
        from ..io.dicom_output import write_dicom_maps

        written["dicom"] = write_dicom_maps(
            result,
            stage / DICOM_FOLDER,
            stem=stem,
            map_dtype=map_dtype,
            workers=workers or overlay_workers(len(result.methods) * len(result.targets)),
        )
    result.timings["write"] = time.perf_counter() - t0
    if report:
        from ..report.html import write_report

        t0 = time.perf_counter()
        written["report"] = write_report(result, stage / REPORT)
        result.timings["report"] = time.perf_counter() - t0
    summary = result.summary()
    summary["map_dtype"] = map_dtype
    summary["files"] = {k: str(Path(v).name) for k, v in written.items()}
    written["summary"] = stage / SUMMARY
    with atomic_path(written["summary"]) as tmp:
        Path(tmp).write_text(to_json(summary))
    return written


def _write_overlays(result, out_dir: Path, stem: str, map_dtype: str, workers, progress) -> dict[str, Path]:
    """Every (method, target) overlay, ``workers`` at a time; ``result.timings["project"]`` gets the
    seconds spent projecting, summed over the workers."""
    jobs = {f"{m}/{t}": (m, t, out_dir / overlay_name(stem, m, t)) for m in result.methods for t in result.targets}
    lock = threading.Lock()
    project_s = [0.0]

    def write_one(method: str, target: str, path: Path) -> Path:
        t0 = time.perf_counter()
        array = result.map_array(method, target)
        spent = time.perf_counter() - t0
        with lock:
            project_s[0] += spent
        write_map(array, result.volume, path, dtype=map_dtype, description=f"{method} {target}")
        if progress:
            progress(1)
        return path

    n = workers or overlay_workers(len(jobs))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="overlay") as pool:
        futures = {key: pool.submit(write_one, *job) for key, job in jobs.items()}
        done, pending = wait(futures.values(), return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in futures.values():
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()
    result.timings["project"] = result.timings.get("project", 0.0) + project_s[0]
    return {key: future.result() for key, future in futures.items()}
