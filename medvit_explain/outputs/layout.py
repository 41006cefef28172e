"""Names of the files ``explain`` writes, and parsing them back (standard library only: the viewers
import this without torch or numpy).

One study's output folder::

    <stem>_<method>_<target>.nii.gz     one overlay per method × target, on the source grid
    predictions.csv                     one row per slice (or ROI view)
    summary.json                        input, model, methods, targets, timings, files
    report.html                         the report (unless --no-report)
    dicom/<stem>_<method>_<target>_pm.dcm   Parametric Maps (--dicom)

The stem is the input's file name without its image suffix (a folder: its name).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from ..vocabulary import IMAGE_SUFFIXES

__all__ = [
    "DICOM_FOLDER",
    "IMAGE_SUFFIXES",
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
]

OVERLAY_SUFFIX = ".nii.gz"
PREDICTIONS = "predictions.csv"
SUMMARY = "summary.json"
REPORT = "report.html"
DICOM_FOLDER = "dicom"


def known_methods(python_exe: str | os.PathLike | None = None) -> list[str]:
    """The registered method names (built-in and plugins), as ``python -m medvit_explain list-methods
    --json`` run by ``python_exe`` (default: this interpreter) prints them, once per interpreter: a
    viewer's own process never imports torch. Code that has the registry at hand passes ``methods`` to
    :func:`parse_overlay_name` / :func:`find_outputs` instead."""
    return list(_methods_from_cli(os.fspath(python_exe or sys.executable)))


@functools.lru_cache(maxsize=4)
def _methods_from_cli(python_exe: str) -> tuple[str, ...]:
    done = subprocess.run(
        [python_exe, "-m", "medvit_explain", "list-methods", "--json"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"`{python_exe} -m medvit_explain list-methods --json` failed: {tail[0]}")
    return tuple(row["name"] for row in json.loads(done.stdout))


STEM_BYTES = 96  # a longer stem is cut (and a hash of the whole added) so every output name fits in 255 bytes


def volume_stem(path: str | os.PathLike) -> str:
    """The file-name stem of outputs of ``path`` (``scan.nii.gz`` → ``scan``; a folder: its name; ``.``:
    the current folder's name). A stem longer than 96 bytes is cut and ends with ``~`` and 8 hex digits of
    its full text's SHA-1, so the overlay names (stem, method, target) still fit a file name."""
    text = str(path).rstrip("/\\") or str(path)
    name = Path(text).name
    if name in ("", ".", ".."):
        name = Path(text).resolve().name or "volume"
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= STEM_BYTES:
        return name
    import hashlib

    digest = hashlib.sha1(raw).hexdigest()[:8]
    return raw[: STEM_BYTES - 9].decode("utf-8", "ignore") + "~" + digest


def overlay_name(stem: str, method: str, target: str) -> str:
    """``<stem>_<method>_<target>.nii.gz``: an overlay's file name."""
    return f"{stem}_{method}_{target}{OVERLAY_SUFFIX}"


def dicom_map_name(stem: str, method: str, target: str) -> str:
    """``<stem>_<method>_<target>_pm.dcm``: a DICOM Parametric Map's file name."""
    return f"{stem}_{method}_{target}_pm.dcm"


def parse_overlay_name(
    name: str | os.PathLike,
    methods: Iterable[str] | None = None,
    targets: Iterable[str] | None = None,
    stem: str | None = None,
) -> tuple[str, str, str] | None:
    """``(stem, method, target)`` of an overlay file name, or None if it is not one.

    The stem and the target may contain underscores; method names may contain ``-`` but not ``_``.
    The name is split at ``_<method>_`` for a known method (the last such place when ``stem`` is not
    given); ``targets``, when given, must contain the target.
    """
    name = Path(name).name
    if not name.endswith(OVERLAY_SUFFIX):
        return None
    core = name[: -len(OVERLAY_SUFFIX)]
    method_list = sorted(methods if methods is not None else known_methods(), key=len, reverse=True)
    target_set = set(targets) if targets is not None else None
    if stem is not None:
        if not core.startswith(stem + "_"):
            return None
        rest = core[len(stem) + 1 :]
        for method in method_list:
            if rest.startswith(method + "_"):
                target = rest[len(method) + 1 :]
                if target and (target_set is None or target in target_set):
                    return stem, method, target
        return None
    best: tuple[int, str, str, str] | None = None
    for method in method_list:
        token = f"_{method}_"
        at = core.rfind(token)
        while at > 0:
            target = core[at + len(token) :]
            if target and (target_set is None or target in target_set):
                if best is None or at > best[0]:
                    best = (at, core[:at], method, target)
                break
            at = core.rfind(token, 0, at)
    return None if best is None else best[1:]


def find_outputs(
    out_dir: str | os.PathLike,
    stem: str,
    methods: Iterable[str] | None = None,
    targets: Iterable[str] | None = None,
) -> dict[tuple[str, str], Path]:
    """Overlay files of ``stem`` in ``out_dir``: ``{(method, target): path}``, sorted by name.

    Temporary files still being written (``.name.XXXX.nii.gz``) are ignored.
    """
    out_dir = Path(out_dir)
    method_list = list(methods) if methods is not None else known_methods()
    target_list = list(targets) if targets is not None else None
    found: dict[tuple[str, str], Path] = {}
    if not out_dir.is_dir():
        return found
    for path in sorted(out_dir.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        parsed = parse_overlay_name(path.name, method_list, target_list, stem=stem)
        if parsed is not None:
            found[(parsed[1], parsed[2])] = path
    return found
