"""Moved: the benchmark lives in :mod:`medvit_explain.workflows.bench` (its clock in ``bench_common``, the
papers' loops in ``bench_loops``, the subprocess runs in ``bench_workers``). This module keeps the old
import path and stays the workers' entry point: ``python -m medvit_explain.bench --memory-worker JSON``
(or ``--clinical-worker JSON``)."""

import sys

from .report.bench import format_table
from .workflows.bench import (
    DEFAULT_VOLUME,
    TARGET_RATIOS,
    BenchResult,
    bench_model,
    check_targets,
    gradcam_available,
    loop_agcam,
    loop_cdam,
    run_bench,
    run_pytorch_gradcam,
    to_json,
)
from .workflows.bench_workers import worker_main

__all__ = [
    "BenchResult",
    "DEFAULT_VOLUME",
    "TARGET_RATIOS",
    "bench_model",
    "check_targets",
    "format_table",
    "gradcam_available",
    "loop_agcam",
    "loop_cdam",
    "run_bench",
    "run_pytorch_gradcam",
    "to_json",
]

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
