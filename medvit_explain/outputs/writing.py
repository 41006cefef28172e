"""Write one explained study's files: overlays in parallel, then the table, DICOM, report and summary.

Each overlay is projected onto the source grid, quantised and compressed by one worker thread, one
(method, target) at a time per worker: memory holds the CT plus ``workers`` full-size maps, whatever
the number of methods and targets. Every file is written under a temporary name and renamed when
complete, so a final path never holds a partial file; the first error stops the remaining overlays and
is raised.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from ..io.nifti import write_map
from ..io.writer import atomic_path, remove_leftovers
from ..vocabulary import DEFAULT_MAP_DTYPE, MAP_DTYPES, to_json
from .layout import DICOM_FOLDER, PREDICTIONS, REPORT, SUMMARY, overlay_name, volume_stem

__all__ = ["MAX_WORKERS", "overlay_workers", "write_outputs"]

MAX_WORKERS = 4  # each in-flight overlay holds one float32 map on the source grid


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
    result.input_checksum()
    t0 = time.perf_counter()
    written = _write_overlays(result, out_dir, stem, map_dtype, workers, progress)
    written["predictions"] = out_dir / PREDICTIONS
    result.predictions.to_csv(written["predictions"])
    if dicom:
        from ..io.dicom_output import write_dicom_maps

        written["dicom"] = write_dicom_maps(
            result,
            out_dir / DICOM_FOLDER,
            stem=stem,
            map_dtype=map_dtype,
            workers=workers or overlay_workers(len(result.methods) * len(result.targets)),
        )
    result.timings["write"] = time.perf_counter() - t0
    if report:
        from ..report.html import write_report

        t0 = time.perf_counter()
        written["report"] = write_report(result, out_dir / REPORT)
        result.timings["report"] = time.perf_counter() - t0
    summary = result.summary()
    summary["map_dtype"] = map_dtype
    summary["files"] = {k: str(Path(v).name) for k, v in written.items()}
    written["summary"] = out_dir / SUMMARY
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
