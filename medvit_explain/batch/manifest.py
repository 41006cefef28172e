"""The studies of a batch job (manifest CSV or folder), read by :mod:`medvit_explain.workflows.studies`,
the one studies/manifest module of every workflow; here the batch's own names are reserved."""

from __future__ import annotations

import os
from collections.abc import Collection

from ..workflows import studies as _studies
from ..workflows.studies import (
    MASK_SUFFIXES,
    MAX_ID_LENGTH,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    Study,
    check_study_id,
    malignancy_from_labels,
)
from .records import JOB_FILES

RESERVED_IDS = JOB_FILES  # no study may be named like a file the job writes at the top of its output folder

__all__ = [
    "MASK_SUFFIXES",
    "MAX_ID_LENGTH",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "RESERVED_IDS",
    "Study",
    "check_study_id",
    "malignancy_from_labels",
    "read_manifest",
]


def read_manifest(source: str | os.PathLike, reserved: Collection[str] = RESERVED_IDS) -> list[Study]:
    """:func:`medvit_explain.workflows.studies.read_manifest` with the job's file names reserved."""
    return _studies.read_manifest(source, reserved=reserved)
