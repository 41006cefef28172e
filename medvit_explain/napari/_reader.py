"""npe2 reader: a CT (NIfTI, NRRD, MHA, a DICOM file or series folder) or a medvit-explain overlay.

Both come back with the file's own geometry (see :mod:`medvit_explain.napari._layers`), so an
overlay opened after its CT lines up with it in world coordinates. A file is an overlay when its
name is ``<stem>_<method>_<target>.nii.gz`` for a registered method and the folder holds the CLI's
``summary.json`` (whose target list, when present, must contain the target).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..outputs.layout import parse_overlay_name
from ..vocabulary import IMAGE_SUFFIXES

_DICOM_PROBE = 8  # files looked at when deciding whether a folder holds DICOM


def get_reader(path: str | os.PathLike | list):
    """The reader function for ``path``, or None when this plugin cannot read it."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_dir():
        return read_volume_layers if _looks_like_dicom_folder(p) else None
    if p.name.lower().endswith(IMAGE_SUFFIXES) or _is_dicom_file(p):
        return read_volume_layers
    return None


def read_volume_layers(path: str | os.PathLike | list) -> list[tuple]:
    """``[LayerDataTuple]``: the CT in greyscale, or the overlay with its diverging colormap."""
    from ..io import load_volume
    from ._layers import ct_layer_data, overlay_layer_data

    if isinstance(path, (list, tuple)):
        path = path[0]
    path = Path(path)
    volume = load_volume(path)
    overlay = overlay_info(path)
    if overlay is None:
        return [ct_layer_data(volume)]
    stem, method, target = overlay
    return [overlay_layer_data(volume, method, target, name=f"{stem} {method}/{target}")]


def overlay_info(path: str | os.PathLike) -> tuple[str, str, str] | None:
    """``(stem, method, target)`` when ``path`` is an overlay the CLI wrote, else None."""
    path = Path(path)
    summary = path.parent / "summary.json"
    if not summary.is_file():
        return None
    targets = None
    try:
        targets = json.loads(summary.read_text()).get("targets") or None
    except (OSError, ValueError, AttributeError):
        targets = None
    from ..registry import method_names

    return parse_overlay_name(path.name, method_names(), targets=targets)


def _is_dicom_file(path: Path) -> bool:
    from ..io.reader import is_dicom_file

    return is_dicom_file(path)


def _looks_like_dicom_folder(folder: Path) -> bool:
    seen = 0
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            candidate = Path(root) / name
            if name.lower().endswith(".dcm") or _is_dicom_file(candidate):
                return True
            seen += 1
            if seen >= _DICOM_PROBE:
                return False
    return False
