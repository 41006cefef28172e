"""Moved: the studies of a batch job (manifest CSV or folder) are read by :mod:`medvit_explain.workflows.studies`,
the one studies/manifest module of every workflow. This module keeps the old import path."""

from ..workflows.studies import (
    MASK_SUFFIXES,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    RESERVED_IDS,
    Study,
    malignancy_from_labels,
    read_manifest,
)

__all__ = [
    "MASK_SUFFIXES",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "RESERVED_IDS",
    "Study",
    "malignancy_from_labels",
    "read_manifest",
]
