"""The output layer: the files of one explained study, named, written and parsed back in one place.

:mod:`.layout` (standard library only) names the files and parses the names back; :func:`write_outputs`
(imported on first use) writes them.
"""

from __future__ import annotations

from typing import Any

from ..vocabulary import DEFAULT_MAP_DTYPE, MAP_DTYPES
from .layout import (
    DICOM_FOLDER,
    IMAGE_SUFFIXES,
    OVERLAY_SUFFIX,
    PREDICTIONS,
    REPORT,
    SUMMARY,
    dicom_map_name,
    find_outputs,
    known_methods,
    overlay_name,
    parse_overlay_name,
    volume_stem,
)

__all__ = [
    "DEFAULT_MAP_DTYPE",
    "DICOM_FOLDER",
    "IMAGE_SUFFIXES",
    "MAP_DTYPES",
    "OVERLAY_SUFFIX",
    "PREDICTIONS",
    "REPORT",
    "SUMMARY",
    "dicom_map_name",
    "find_outputs",
    "known_methods",
    "overlay_name",
    "parse_overlay_name",
    "volume_stem",
    "write_outputs",
]


def write_outputs(result, out_dir, **options: Any):
    """Write one explained study's files (see :func:`medvit_explain.outputs.writing.write_outputs`)."""
    from .writing import write_outputs as _write

    return _write(result, out_dir, **options)
