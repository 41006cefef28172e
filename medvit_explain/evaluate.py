"""Moved: the evaluation lives in :mod:`medvit_explain.workflows.evaluate`; its HTML, ``metrics.json`` and
tables in :mod:`medvit_explain.report.evaluation`. This module keeps the old import path."""

from .report.evaluation import format_table, markdown_table, table_rows, write_evaluation
from .workflows.evaluate import (
    EvalSlices,
    EvaluationResult,
    MethodEvaluation,
    evaluate_explanations,
    load_eval_slices,
    lung_mask_path,
    model_metrics,
)

__all__ = [
    "EvalSlices",
    "EvaluationResult",
    "MethodEvaluation",
    "evaluate_explanations",
    "format_table",
    "load_eval_slices",
    "lung_mask_path",
    "markdown_table",
    "model_metrics",
    "table_rows",
    "write_evaluation",
]
