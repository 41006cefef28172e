"""Moved: training lives in :mod:`medvit_explain.workflows.train` (studies in ``workflows.studies``, slice
labels in ``workflows.labels``, ROC AUC in ``workflows.scores``). This module keeps the old import path."""

from .workflows.labels import BIOMARKER_KEYS, load_labelled_study, slice_targets
from .workflows.scores import roc_auc
from .workflows.studies import Study, find_studies
from .workflows.train import (
    SliceSet,
    TokenLabelHead,
    TrainResult,
    evaluate,
    forward_with_tokens,
    load_slices,
    split_studies,
    task_loss,
    train,
)

__all__ = [
    "BIOMARKER_KEYS",
    "SliceSet",
    "Study",
    "TokenLabelHead",
    "TrainResult",
    "evaluate",
    "find_studies",
    "forward_with_tokens",
    "load_labelled_study",
    "load_slices",
    "roc_auc",
    "slice_targets",
    "split_studies",
    "task_loss",
    "train",
]
