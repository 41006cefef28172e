"""Words every layer shares, defined once (standard library only: the CLI, the API, the writers and the
viewers import them without torch or numpy, and so agree).

* devices: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (:func:`is_device`);
* image suffixes: files read as volumes (``VOLUME_SUFFIXES``) and the suffixes stripped to make an
  output stem (``IMAGE_SUFFIXES``, also ``.dcm``);
* label maps beside a CT: the phantoms' ``<name>_nodules`` / ``_lungs`` / ``_features`` stems
  (``PHANTOM_MASK_SUFFIXES``: never a study or a CT), any label-map stem (``LABEL_MAP_SUFFIXES``) and
  the words that name a label map (``LABEL_NAME_WORDS``);
* the primary target (malignancy, else the first binary target) and its probability column;
* target resolution: names, indices, ``"all"`` or comma lists → output indices (:func:`resolve_targets`);
* how overlays are stored (``MAP_DTYPES``) and how results become JSON (:func:`jsonable`, :func:`to_json`).
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import TargetError

# -- devices ----------------------------------------------------------------------------------------
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")
EXPECTED_DEVICES = "auto, cpu, cuda or cuda:N"
DEVICE_CHOICES = ("auto", "cpu", "cuda")  # what a viewer's device menu offers (cuda:N is typed in the CLI)


def is_device(text: str) -> bool:
    """Whether ``text`` is a device string this tool accepts (availability is checked when used)."""
    return isinstance(text, str) and DEVICE_PATTERN.match(text.strip().lower()) is not None


# -- files ------------------------------------------------------------------------------------------
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_SUFFIXES = (*VOLUME_SUFFIXES, ".dcm")
NODULES_SUFFIX, LUNGS_SUFFIX, FEATURES_SUFFIX = "_nodules", "_lungs", "_features"  # make-phantom's label maps
# the phantom generator's versions (medvit_explain.phantom.nodules.GRADES); the first is the default
PHANTOM_GENERATOR_VERSIONS = ("2.0", "2.1", "2.2")
PHANTOM_MASK_SUFFIXES = (NODULES_SUFFIX, LUNGS_SUFFIX, FEATURES_SUFFIX)  # stems of label maps, not studies
LABEL_MAP_SUFFIXES = (*PHANTOM_MASK_SUFFIXES, "_mask", "_seg")  # a file stem ending so is no CT to show
LABEL_NAME_WORDS = (  # a stem ending in "_<word>" (or "-", ".") names a label map in the viewers
    *(suffix[1:] for suffix in PHANTOM_MASK_SUFFIXES),
    "mask",
    "masks",
    "seg",
    "segmentation",
    "label",
    "labels",
    "labelmap",
)
# the shipped models by name: (what it is, the recipe that makes it, its folder under medvit_explain/assets)
SHIPPED_MODELS = {
    "sample-slice": ("whole axial slices", "configs/sample_model.yaml", "sample_model"),
    "sample-roi": ("nodule ROIs", "configs/sample_roi_model.yaml", "sample_roi"),
    "sample-roi3d": ("3D nodule cubes", "configs/sample_roi3d_model.yaml", "sample_roi3d"),
}
DEFAULT_MODEL = "sample-slice"  # what --model means when it is not given (and no ROI option is)
DEFAULT_ROI_MODEL = "sample-roi"  # ... and when an ROI option is
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

MAP_DTYPES = ("int16", "float32")
DEFAULT_MAP_DTYPE = "int16"

# -- targets ----------------------------------------------------------------------------------------
PRIMARY_TARGET = "malignancy"
PRIMARY_COLUMN = f"{PRIMARY_TARGET}_prob"


def primary_target(names: Sequence[str], kinds: Sequence[str]) -> int:
    """Index of the malignancy target, else of the first binary target, else 0."""
    if PRIMARY_TARGET in names:
        return list(names).index(PRIMARY_TARGET)
    return next((i for i, k in enumerate(kinds) if k == "binary"), 0)


def resolve_targets(names: Sequence[str], targets: Any = None) -> list[int]:
    """Output indices for ``targets``, in the order given, duplicates dropped.

    ``None`` or ``"all"`` → every target; a name; an index (a string of digits counts as one when no
    target has that name); a comma-separated string; or a list (or a 1-D tensor / array) of those.
    Raises :class:`~medvit_explain.errors.TargetError` with the valid names."""
    names = list(names)
    if targets is None or (isinstance(targets, str) and targets.strip().lower() == "all" and "all" not in names):
        return list(range(len(names)))
    if hasattr(targets, "tolist") and not isinstance(targets, str):
        targets = targets.tolist()  # a torch tensor or numpy array (0-d gives a scalar)
    if isinstance(targets, str):
        items: list[Any] = [p.strip() for p in targets.split(",") if p.strip()] or [targets]
    elif isinstance(targets, Iterable):
        items = list(targets)
        if not items:
            raise TargetError(f"expected at least one target from {', '.join(names)}, got none")
    else:
        items = [targets]
    out: list[int] = []
    for item in items:
        i = _target_index(names, item)
        if i not in out:
            out.append(i)
    return out


def _target_index(names: list[str], target: Any) -> int:
    if isinstance(target, str):
        key = target.strip()
        if key in names:
            return names.index(key)
        if key.isdigit():
            return _target_index(names, int(key))
    elif hasattr(target, "__index__") and not isinstance(target, bool):  # int, numpy integers
        index = operator.index(target)
        if 0 <= index < len(names):
            return index
    raise TargetError(
        f"unknown target {target!r}; expected one of {', '.join(names)} (or an index 0..{len(names) - 1})"
    )


# -- JSON -------------------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: mappings and sequences recursively, tuples as lists, paths as
    strings, numpy scalars as Python numbers, non-finite floats as ``None``."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()  # numpy / torch scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(value: Any, indent: int | None = 2) -> str:
    """``json.dumps(jsonable(value))``: the one way results are written as JSON."""
    return json.dumps(jsonable(value), indent=indent)
