"""The output layer: the files of one explained study, named, written and parsed back in one place.

:mod:`.layout` (standard library only) names the files and parses the names back; :func:`write_outputs`
(imported on first use) writes them.
"""

from __future__ import annotations

from typing import Any

from ..vocabulary import DEFAULT_MAP_DTYPE, MAP_DTYPES
from . import layout
from .layout import *  # noqa: F403 - the names of the files are this layer's public API

__all__ = [*layout.__all__, "DEFAULT_MAP_DTYPE", "MAP_DTYPES", "write_outputs"]


def write_outputs(result, out_dir, **options: Any):
    """Write one explained study's files (see :func:`medvit_explain.outputs.writing.write_outputs`)."""
    from .writing import write_outputs as _write

    return _write(result, out_dir, **options)
