"""Viewer-side helpers shared by the 3D Slicer module and the napari plugin.

Plain Python and the standard library only: no torch, numpy, Qt or ``slicer`` import (numpy is
imported inside :func:`color_range` only when it is handed an array). Everything a viewer needs that
does not need the viewer lives here, so our test suite covers it:

* building the ``medvit-explain explain`` command (an argument list, never a shell string) and running
  it while streaming its stderr (:func:`build_explain_command`, :func:`run_command`);
* reading its progress bar and its one-line error (:func:`parse_progress`, :func:`cli_error_message`);
* finding its overlay files (``<stem>_<method>_<target>.nii.gz``; the names come from the output layer,
  :mod:`medvit_explain.outputs.layout`, re-exported here) and parsing ``predictions.csv``
  (:func:`find_outputs`, :func:`parse_overlay_name`, :func:`parse_predictions`, :func:`top_slice`);
* the display window of a signed map, symmetric around 0 (:func:`color_range`).
"""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .outputs.layout import (
    OVERLAY_SUFFIX,
    find_outputs,
    known_methods,
    overlay_name,
    parse_overlay_name,
    volume_stem,
)
from .vocabulary import (
    DEFAULT_MAP_DTYPE,
    EXPECTED_DEVICES,
    IMAGE_SUFFIXES,
    MAP_DTYPES,
    PRIMARY_COLUMN,
    is_device,
)

__all__ = [
    "DEFAULT_OPACITY",
    "IMAGE_SUFFIXES",
    "MAP_DTYPES",
    "OVERLAY_SUFFIX",
    "ExplainCommandError",
    "Progress",
    "build_explain_command",
    "bundled_sample_ct",
    "cli_error_message",
    "color_range",
    "find_outputs",
    "known_methods",
    "overlay_name",
    "parse_overlay_name",
    "parse_predictions",
    "parse_progress",
    "run_command",
    "top_slice",
    "volume_stem",
]

DEFAULT_OPACITY = 0.7
_MASK_SUFFIXES = ("_nodules.nii.gz", "_lungs.nii.gz", "_mask.nii.gz", "_seg.nii.gz")
_INT_COLUMNS = frozenset({"slice", "source_index", "roi"})


class ExplainCommandError(RuntimeError):
    """The ``medvit-explain`` subprocess failed; ``str(exc)`` is the CLI's own one-line message."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


# -- command ----------------------------------------------------------------------------------------
def build_explain_command(
    python_exe: str | os.PathLike,
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    methods: Sequence[str] = (),
    targets: Sequence[str] = (),
    device: str = "auto",
    batch_size: int | None = None,
    map_dtype: str = DEFAULT_MAP_DTYPE,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argument list that runs ``python -m medvit_explain explain`` (for ``subprocess``, no shell).

    ``model=None`` uses the shipped model; empty ``methods`` / ``targets`` use the CLI's defaults.
    Each method and target is passed as its own ``--method`` / ``--target`` option. ``map_dtype``:
    ``int16`` (compact overlays, the default) or ``float32`` (exact values).

    Raises:
        ValueError: unknown method or device, or a non-positive batch size ("expected X, got Y").
    """
    if str(python_exe).strip() == "":
        raise ValueError("expected a Python executable, got an empty path")
    names = known_methods()
    for method in methods:
        if method not in names:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(names)}")
    if not is_device(device):
        raise ValueError(f"unknown device {device!r}; expected {EXPECTED_DEVICES}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"expected a positive integer batch size, got {batch_size!r}")
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"unknown map dtype {map_dtype!r}; expected one of {', '.join(MAP_DTYPES)}")
    cmd = [os.fspath(python_exe), "-m", "medvit_explain", "explain", os.fspath(input_path), "--out", os.fspath(out_dir)]
    if model is not None and str(model).strip():
        cmd += ["--model", os.fspath(model)]
    for method in methods:
        cmd += ["--method", str(method)]
    for target in targets:
        cmd += ["--target", str(target)]
    cmd += ["--device", device]
    if batch_size is not None:
        cmd += ["--batch-size", str(int(batch_size))]
    if map_dtype != DEFAULT_MAP_DTYPE:
        cmd += ["--map-dtype", map_dtype]
    cmd += [str(a) for a in extra_args]
    return cmd


def run_command(
    cmd: Sequence[str],
    on_line: Callable[[str], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> str:
    """Run ``cmd`` (an argument list; ``shell=False``), streaming stdout and stderr line by line.

    Progress-bar updates (tqdm rewrites its line with ``\\r``; text mode turns each into a line) go to
    ``on_progress``; every other non-empty line goes to ``on_line``. Returns the whole output. Raises
    :class:`ExplainCommandError` with the CLI's ``error: ...`` message when the exit code is not 0.
    """
    if isinstance(cmd, (str, bytes)):
        raise TypeError("expected an argument list, got a string (a shell command line is never run)")
    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    lines: list[str] = []
    with subprocess.Popen(
        list(cmd),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=full_env,
        cwd=cwd,
        shell=False,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            lines.append(line)
            progress = parse_progress(line)
            if progress is not None:
                if on_progress:
                    on_progress(progress)
            elif on_line:
                on_line(line)
        returncode = proc.wait()
    text = "\n".join(lines)
    if returncode != 0:
        message = cli_error_message(text) or f"medvit-explain failed with exit code {returncode}"
        raise ExplainCommandError(message, returncode)
    return text


# -- stream parsing ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """One progress-bar update: ``done`` of ``total`` items (``fraction`` in [0, 1])."""

    done: int
    total: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


# tqdm's default bar: "desc:  40%|████      | 4/10 [00:01<00:02,  3.2slice/s]"
_TQDM = re.compile(r"(?:(\d{1,3})%\|[^|]*\|)\s*(\d+(?:\.\d+)?)(?:[kMG])?/(\d+(?:\.\d+)?)(?:[kMG])?")


def parse_progress(line: str) -> Progress | None:
    """A :class:`Progress` from one tqdm line of the CLI's stderr, or None for any other line."""
    for piece in reversed(line.split("\r")):  # a raw chunk may still hold several \r-separated updates
        match = _TQDM.search(piece)
        if match:
            done, total = float(match.group(2)), float(match.group(3))
            return Progress(int(done), int(total))
    return None


def cli_error_message(stderr_text: str) -> str | None:
    """The message of the CLI's last ``error: ...`` line; else the last line of a traceback; else None."""
    lines = [ln.strip() for ln in stderr_text.replace("\r", "\n").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        return lines[-1]
    return None


# -- outputs ----------------------------------------------------------------------------------------
def bundled_sample_ct() -> Path | None:
    """The sample CT shipped with the package (``assets/sample_data``) or beside a source checkout
    (``sample_data/``): the first ``*.nii.gz`` that is not a mask; None when there is none."""
    here = Path(__file__).resolve().parent
    for folder in (here / "assets" / "sample_data", here.parent / "sample_data"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.nii.gz")):
            if not path.name.startswith(".") and not path.name.endswith(_MASK_SUFFIXES):
                return path
    return None


def parse_predictions(csv_path: str | os.PathLike) -> tuple[list[str], list[dict[str, Any]]]:
    """``predictions.csv`` → ``(columns, rows)``; numbers become int (slice, source_index, roi) or float."""
    with open(csv_path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        columns = list(reader.fieldnames or [])
        rows = [{k: _number(k, v) for k, v in row.items() if k is not None} for row in reader]
    return columns, rows


def _number(column: str, text: str | None) -> Any:
    if text is None or text == "":
        return None
    try:
        return int(text) if column in _INT_COLUMNS else float(text)
    except ValueError:
        return text


def top_slice(rows: Sequence[Mapping[str, Any]], column: str = PRIMARY_COLUMN) -> Mapping[str, Any] | None:
    """The row with the highest ``column`` (first one on ties); None when no row has a number there.

    In ROI mode only the per-nodule rows (``view == "mean"``) compete."""
    if any("view" in row for row in rows):
        rows = [row for row in rows if row.get("view") == "mean"] or list(rows)
    best, best_value = None, -math.inf
    for row in rows:
        value = row.get(column)
        if isinstance(value, (int, float)) and math.isfinite(value) and value > best_value:
            best, best_value = row, value
    return best


# -- display ----------------------------------------------------------------------------------------
def color_range(values: Any, percentile: float | None = None) -> tuple[float, float]:
    """A display window ``(-m, m)`` symmetric around 0 for a signed map, so 0 is the colormap's centre.

    ``values`` is a ``(min, max)`` pair or any array of map values; ``m`` = max |value| (or the given
    percentile of |value|, e.g. 99.5 to ignore a few outliers). Non-finite values are ignored; an
    all-zero or empty map gets ``(-1.0, 1.0)`` so the window never collapses.
    """
    if percentile is not None and not 0 < percentile <= 100:
        raise ValueError(f"expected a percentile in (0, 100], got {percentile!r}")
    if hasattr(values, "shape") or (percentile is not None and not isinstance(values, (int, float))):
        import numpy as np

        a = np.abs(np.asarray(values, dtype=np.float64))
        a = a[np.isfinite(a)]
        if a.size == 0:
            m = 0.0
        elif percentile is None or percentile == 100:
            m = float(a.max())
        else:
            m = float(np.percentile(a, percentile))
    else:
        finite = [abs(float(v)) for v in _flatten(values) if math.isfinite(float(v))]
        m = max(finite, default=0.0)
    if not m > 0:
        return (-1.0, 1.0)
    return (-m, m)


def _flatten(values: Any) -> Iterable[float]:
    if isinstance(values, (int, float)):
        yield values
        return
    for v in values:
        yield from _flatten(v)
