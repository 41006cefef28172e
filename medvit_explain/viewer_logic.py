"""Viewer-side helpers shared by the 3D Slicer module and the napari plugin.

Plain Python and the standard library only: no torch, numpy, Qt or ``slicer`` import (numpy is
imported inside :func:`color_range` only when it is handed an array). Everything a viewer needs that
does not need the viewer lives here, so our test suite covers it:

* finding the command line a viewer runs: ``python -m medvit_explain`` of an interpreter, or an existing
  ``medvit-explain`` executable (a virtual environment, a checkout's ``.venv``) (:func:`cli_command`);
* building the ``medvit-explain explain`` command (an argument list, never a shell string) and running
  it while streaming its stderr (:func:`explain_command`, :func:`build_explain_command`, :func:`run_command`);
* the method list of ``list-methods --json`` and a checkpoint's targets from its ``config.json``, without
  torch (:func:`list_methods_command`, :func:`parse_method_list`, :func:`model_targets`);
* nodule centres as the ``--roi-centers`` CSV (LPS mm) (:func:`write_roi_centers`);
* reading its progress bar and its one-line error (:func:`parse_progress`, :func:`cli_error_message`);
* finding its overlay files (``<stem>_<method>_<target>.nii.gz``; the names come from the output layer,
  :mod:`medvit_explain.outputs.layout`, re-exported here) and parsing ``predictions.csv``
  (:func:`find_outputs`, :func:`parse_overlay_name`, :func:`parse_predictions`, :func:`top_slice`);
* the display window of a signed map, symmetric around 0 (:func:`color_range`), a robust window from a
  percentile of the non-zero |value|s, positive-only for a non-negative map (:func:`robust_window`), and a
  colour table whose centre is transparent (:func:`overlay_colors`).

This module must import on Python 3.9 too (3D Slicer 5.0–5.8 load it from a medvit-explain checkout or
virtual environment without installing anything; see ``plugins/slicer``): no runtime ``X | Y`` types,
no ``match``.
"""

from __future__ import annotations

import csv
import json
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
    PREDICTIONS,
    REPORT,
    SUMMARY,
    find_outputs,
    known_methods,
    overlay_name,
    parse_overlay_name,
    volume_stem,
)
from .vocabulary import (
    ASSETS_DIR,
    DEFAULT_MAP_DTYPE,
    DEFAULT_MODEL,
    DEVICE_CHOICES,
    EXPECTED_DEVICES,
    IMAGE_SUFFIXES,
    LABEL_MAP_SUFFIXES,
    MAP_DTYPES,
    PRIMARY_COLUMN,
    SHIPPED_MODELS,
    is_device,
)

__all__ = [
    "DEFAULT_OPACITY",
    "DEFAULT_PERCENTILE",
    "DEFAULT_TRANSPARENT_FRACTION",
    "DEVICE_CHOICES",
    "IMAGE_SUFFIXES",
    "MAP_DTYPES",
    "OVERLAY_SUFFIX",
    "PREDICTIONS",
    "PRIMARY_COLUMN",
    "REPORT",
    "SUMMARY",
    "ExplainCommandError",
    "Progress",
    "build_explain_command",
    "bundled_sample_ct",
    "cli_command",
    "cli_error_message",
    "color_range",
    "explain_command",
    "find_outputs",
    "known_methods",
    "list_methods_command",
    "model_targets",
    "overlay_colors",
    "overlay_name",
    "parse_method_list",
    "parse_overlay_name",
    "parse_predictions",
    "parse_progress",
    "robust_window",
    "run_command",
    "top_slice",
    "volume_stem",
    "write_roi_centers",
]

DEFAULT_OPACITY = 0.7
DEFAULT_PERCENTILE = 99.0  # of the non-zero |value|s: the display window of a map
DEFAULT_TRANSPARENT_FRACTION = 0.1  # |value| below this fraction of the window is not drawn
_MASK_SUFFIXES = tuple(f"{suffix}.nii.gz" for suffix in LABEL_MAP_SUFFIXES)
_INT_COLUMNS = frozenset({"slice", "source_index", "roi", "label", "volume"})


class ExplainCommandError(RuntimeError):
    """The ``medvit-explain`` subprocess failed; ``str(exc)`` is the CLI's own one-line message."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


# -- command ----------------------------------------------------------------------------------------
_PYTHON_NAME = re.compile(r"^(python(\d+(\.\d+)?)?|pythonslicer|python-real)(\.exe)?$", re.IGNORECASE)
_SCRIPT_NAMES = ("medvit-explain", "medvit-explain.exe")


def cli_command(executable: str | os.PathLike) -> list[str]:
    """The argument list that starts the ``medvit-explain`` command line through ``executable``.

    * a Python interpreter (``python``, ``python3.11``, ``PythonSlicer``, ``python.exe``) →
      ``[exe, "-m", "medvit_explain"]``;
    * a folder: a virtual environment (``bin/medvit-explain``, ``Scripts/medvit-explain.exe``) or a
      checkout with one in ``.venv/`` → that ``medvit-explain`` script;
    * any other file (the ``medvit-explain`` console script, or a wrapper script) → ``[exe]``.

    Raises:
        ValueError: an empty path, a path that does not exist, a folder without a ``medvit-explain``
            script or a file that is not executable ("expected X, got Y").
    """
    text = str(executable).strip() if executable is not None else ""
    if not text:
        raise ValueError("expected the path of a medvit-explain executable or a Python interpreter, got an empty path")
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        for venv in (path, path / ".venv", path / "venv"):
            for sub, name in (("bin", _SCRIPT_NAMES[0]), ("Scripts", _SCRIPT_NAMES[1])):
                script = venv / sub / name
                if script.is_file():
                    return [str(script)]
        raise ValueError(
            f"expected a virtual environment or a checkout with a medvit-explain script (bin/medvit-explain, "
            f"Scripts/medvit-explain.exe or .venv/bin/medvit-explain), got the folder {path}"
        )
    if not path.is_file():
        raise ValueError(f"expected an existing medvit-explain executable or Python interpreter, got {path} (missing)")
    if os.name != "nt" and not os.access(str(path), os.X_OK):
        raise ValueError(f"expected an executable file, got {path} (not executable: chmod +x it)")
    if _PYTHON_NAME.match(path.name):
        return [str(path), "-m", "medvit_explain"]
    return [str(path)]


def explain_command(
    cli: Sequence[str],
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    methods: Sequence[str] = (),
    targets: Sequence[str] = (),
    device: str = "auto",
    batch_size: int | None = None,
    map_dtype: str = DEFAULT_MAP_DTYPE,
    roi_centers: str | os.PathLike | None = None,
    roi_mask: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
    method_names: Sequence[str] | None = None,
) -> list[str]:
    """``cli + ["explain", input, "--out", out_dir, ...]``: the ``explain`` argument list for ``subprocess``.

    ``cli`` is what :func:`cli_command` returns. ``model=None`` uses the shipped model; empty ``methods`` /
    ``targets`` use the CLI's defaults; each method and target is its own ``--method`` / ``--target``.
    ``map_dtype``: ``int16`` (compact overlays, the default) or ``float32`` (exact values).
    ``roi_centers`` (a CSV of LPS mm centres, see :func:`write_roi_centers`) or ``roi_mask`` (an instance
    mask on the CT's grid) explain nodule ROIs instead of slices. ``method_names``: the registered methods
    to check ``methods`` against (the CLI's own ``list-methods``); None leaves the check to the CLI.

    Raises:
        ValueError: unknown method or device, a non-positive batch size, both ROI inputs at once.
    """
    cli = [os.fspath(a) for a in cli]
    if not cli or not str(cli[0]).strip():
        raise ValueError("expected the medvit-explain command line (see cli_command), got an empty one")
    if method_names is not None:
        names = list(method_names)
        for method in methods:
            if method not in names:
                raise ValueError(f"unknown method {method!r}; expected one of {', '.join(names)}")
    if not is_device(device):
        raise ValueError(f"unknown device {device!r}; expected {EXPECTED_DEVICES}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"expected a positive integer batch size, got {batch_size!r}")
    if map_dtype not in MAP_DTYPES:
        raise ValueError(f"unknown map dtype {map_dtype!r}; expected one of {', '.join(MAP_DTYPES)}")
    if roi_centers is not None and roi_mask is not None:
        raise ValueError("expected either ROI centres or an ROI mask, got both")
    cmd = [*cli, "explain", os.fspath(input_path), "--out", os.fspath(out_dir)]
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
    if roi_centers is not None:
        cmd += ["--roi-centers", os.fspath(roi_centers)]
    if roi_mask is not None:
        cmd += ["--roi-mask", os.fspath(roi_mask)]
    cmd += [str(a) for a in extra_args]
    return cmd


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
    roi_centers: str | os.PathLike | None = None,
    roi_mask: str | os.PathLike | None = None,
) -> list[str]:
    """The argument list that runs ``python -m medvit_explain explain`` (for ``subprocess``, no shell).

    :func:`explain_command` with ``cli = [python_exe, "-m", "medvit_explain"]``, the methods checked
    against this interpreter's registry (:func:`known_methods`).

    Raises:
        ValueError: unknown method or device, or a non-positive batch size ("expected X, got Y").
    """
    if str(python_exe).strip() == "":
        raise ValueError("expected a Python executable, got an empty path")
    return explain_command(
        [os.fspath(python_exe), "-m", "medvit_explain"],
        input_path,
        out_dir,
        model=model,
        methods=methods,
        targets=targets,
        device=device,
        batch_size=batch_size,
        map_dtype=map_dtype,
        roi_centers=roi_centers,
        roi_mask=roi_mask,
        extra_args=extra_args,
        method_names=known_methods() if methods else None,
    )


def list_methods_command(cli: Sequence[str]) -> list[str]:
    """``cli + ["list-methods", "--json"]``: what prints the registered methods (plugins included)."""
    return [*(os.fspath(a) for a in cli), "list-methods", "--json"]


def parse_method_list(text: str) -> list[dict[str, Any]]:
    """The rows of ``list-methods --json`` from a command's output (which may hold other lines, e.g.
    warnings on a merged stderr): each a dict with at least ``name``.

    Raises:
        ValueError: no JSON list of methods in ``text``.
    """
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^\s*\[", text, re.MULTILINE):
        try:
            rows, _ = decoder.raw_decode(text[match.start() :].lstrip())
        except json.JSONDecodeError:
            continue
        if isinstance(rows, list) and all(isinstance(r, dict) and "name" in r for r in rows):
            return rows
    tail = text.strip().splitlines()[-1:] or ["no output"]
    raise ValueError(f"expected the JSON method list of `medvit-explain list-methods --json`, got: {tail[0]}")


def model_targets(model: str | os.PathLike | None = None) -> list[dict[str, Any]] | None:
    """A checkpoint's targets ``[{"name", "kind", ...}]`` read from its JSON config, without torch.

    ``model``: None (the model shipped with the package), a checkpoint folder (``config.json``), a weights
    file (its sibling ``.json`` or the folder's ``config.json``) or the config itself. Returns None when
    there is no JSON config to read or it names its task instead of listing it (e.g. ``"lidc"``): the
    CLI then knows the targets, the viewer does not.

    Raises:
        ValueError: a config that is not valid JSON or whose targets have no names.
    """
    if model is None or not str(model).strip():
        path = ASSETS_DIR / SHIPPED_MODELS[DEFAULT_MODEL][2]
    elif str(model).strip() in SHIPPED_MODELS:  # a shipped model's name (as the CLI reads --model)
        path = ASSETS_DIR / SHIPPED_MODELS[str(model).strip()][2]
    else:
        path = Path(os.path.expanduser(str(model).strip()))
    if path.is_dir():
        candidates = [path / "config.json"]
    elif path.suffix.lower() == ".json":
        candidates = [path]
    else:
        candidates = [path.with_suffix(".json"), path.parent / "config.json"]
    config_path = next((c for c in candidates if c.is_file()), None)
    if config_path is None:
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"expected a JSON model config, got {config_path} ({exc})") from None
    spec = config.get("task_spec") if isinstance(config, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("targets"), list):
        return None
    targets = [t for t in spec["targets"] if isinstance(t, dict)]
    if not targets or not all(isinstance(t.get("name"), str) and t["name"] for t in targets):
        raise ValueError(f"expected named targets in {config_path} (task_spec.targets[].name), got {spec['targets']!r}")
    return [dict(t) for t in targets]


def write_roi_centers(path: str | os.PathLike, centres_lps: Iterable[Sequence[float]]) -> Path:
    """Write nodule centres (LPS millimetres, one ``(x, y, z)`` each) as the CSV ``--roi-centers`` reads
    (columns ``x_mm,y_mm,z_mm``). Raises ValueError for no centre or a non-finite coordinate."""
    rows = [tuple(float(v) for v in c) for c in centres_lps]
    if not rows:
        raise ValueError("expected at least one ROI centre, got none")
    for row in rows:
        if len(row) != 3 or not all(math.isfinite(v) for v in row):
            raise ValueError(f"expected finite (x, y, z) centres in LPS mm, got {row!r}")
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["x_mm", "y_mm", "z_mm"])
        for row in rows:
            writer.writerow([repr(v) for v in row])
    return path


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
    """One progress-bar update: ``done`` of ``total`` items (``fraction`` in [0, 1]); ``label`` is the
    bar's description (``explain``, ``write``; empty when the bar has none)."""

    done: int
    total: int
    label: str = ""

    @property
    def fraction(self) -> float:
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


# tqdm's default bar: "desc:  40%|████      | 4/10 [00:01<00:02,  3.2slice/s]"
_TQDM = re.compile(r"(\d{1,3})%\|[^|]*\|\s*(\d+(?:\.\d+)?)(?:[kMG])?/(\d+(?:\.\d+)?)(?:[kMG])?")


def parse_progress(line: str) -> Progress | None:
    """A :class:`Progress` from one tqdm line of the CLI's stderr, or None for any other line."""
    for piece in reversed(line.split("\r")):  # a raw chunk may still hold several \r-separated updates
        match = _TQDM.search(piece)
        if match:
            done, total = float(match.group(2)), float(match.group(3))
            label = piece[: match.start()].strip().rstrip(":").strip()
            return Progress(int(done), int(total), label)
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
    """``predictions.csv`` → ``(columns, rows)``; numbers become int (slice, source_index, roi, label, volume)
    or float."""
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


def robust_window(values: Any, percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
    """The display window of a map: ``(-m, m)`` for a signed map, ``(0, m)`` for a non-negative one
    (AG-CAM, attention, rollout: nothing below 0 to show).

    ``m`` is the ``percentile`` of |value| over the finite, non-zero voxels: a map is 0 outside the body
    and peaks on a few voxels, so max |value| (or a percentile over every voxel) leaves most slices
    almost invisible. ``values``: any array (numpy is imported here only). A map with no non-zero value
    gets ``(-1, 1)`` (or ``(0, 1)``), so the window never collapses.

    Raises:
        ValueError: a percentile outside (0, 100].
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"expected a percentile in (0, 100], got {percentile!r}")
    import numpy as np

    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    signed = bool(a.size and a.min() < 0)
    a = np.abs(a[a != 0])
    m = float(np.percentile(a, percentile)) if a.size else 0.0
    if not m > 0:
        m = 1.0
    return (-m, m) if signed else (0.0, m)


# FSL-style overlays: red → yellow for evidence for the target, blue → light blue against it
_POSITIVE_RAMP = ((0.85, 0.0, 0.0), (1.0, 1.0, 0.0))
_NEGATIVE_RAMP = ((0.0, 0.15, 0.9), (0.3, 0.9, 1.0))


def overlay_colors(
    n: int = 256, signed: bool = True, transparent_fraction: float = DEFAULT_TRANSPARENT_FRACTION
) -> list[tuple[float, float, float, float]]:
    """``n`` RGBA entries for a colour table spanning the display window, with a transparent centre.

    Entry ``i`` stands for ``t`` in [-1, 1] (signed; the window's centre, value 0, is ``t = 0``) or in
    [0, 1] (``signed=False``). Where ``|t| < transparent_fraction`` the alpha is 0: weak evidence leaves
    the CT visible. Beyond it the alpha grows linearly with ``|t|`` up to 1 and the colour runs from red to
    yellow (``t > 0``) or from blue to light blue (``t < 0``). (3D Slicer's slice views draw any non-zero
    alpha as opaque at the layer's opacity, so there the transparent band is what shows.)

    Raises:
        ValueError: ``n < 2`` or a fraction outside [0, 1).
    """
    if int(n) != n or n < 2:
        raise ValueError(f"expected at least 2 colours, got {n!r}")
    if not 0 <= transparent_fraction < 1:
        raise ValueError(f"expected a transparent fraction in [0, 1), got {transparent_fraction!r}")
    colors = []
    for i in range(int(n)):
        u = i / (n - 1)
        t = 2 * u - 1 if signed else u
        mag = abs(t)
        if mag < transparent_fraction:
            colors.append((0.0, 0.0, 0.0, 0.0))
            continue
        s = (mag - transparent_fraction) / (1 - transparent_fraction)
        lo, hi = _POSITIVE_RAMP if t >= 0 else _NEGATIVE_RAMP
        rgb = tuple(a + (b - a) * s for a, b in zip(lo, hi))
        colors.append((*rgb, min(1.0, 0.35 + 0.65 * s)))
    return colors
