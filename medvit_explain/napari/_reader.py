"""npe2 reader: a CT (NIfTI, NRRD, MHA, a DICOM file or series folder), a label map or an overlay.

Each file is shown reoriented to LPS axis codes with its own exact geometry (see
:mod:`medvit_explain.napari._layers`), so layers of one study line up in world coordinates whatever
the acquisition. What a file is, is decided here (:func:`classify`), in this order; the first rule
that holds wins, and the reason is kept in the layer's ``metadata["medvit"]["reason"]``:

1. **overlay** (a signed map: diverging colormap centred at 0, colour bar):
   a. the NIfTI header's description is ``"<method> <target>"`` for a registered method: what
      ``explain`` writes into every overlay (``io.nifti.write_map``), so a renamed or moved overlay
      is still recognised; or
   b. the name is ``<stem>_<method>_<target>.nii.gz`` for a registered method and the folder holds the
      CLI's ``summary.json`` (whose target list, when present, must contain the target): overlays of
      other writers or older versions. A name alone is not enough (a CT may be called
      ``lung_cdam_malignancy.nii.gz``).
2. **labels** (a ``labels`` layer), when every voxel is a whole number ≥ 0 and
   a. the name's stem ends with a label word (``_lungs``, ``_nodules``, ``_mask``, ``_seg``,
      ``_labels``, … see ``LABEL_NAME_WORDS``; ``-`` or ``.`` before it also count): our phantoms
      write ``<name>_lungs.nii.gz``, ``<name>_nodules.nii.gz`` and ``<name>_features.nii.gz``; or
   b. the NIfTI intent is ``NIFTI_INTENT_LABEL``; or
   c. the file stores integers (its header's pixel type, not the values: a float CT may hold whole
      HU) and holds at most ``MAX_LABELS`` distinct values. A CT has negative HU (air is −1000) or,
      stored unsigned with an offset, thousands of distinct values, so it never passes.
   A name that says "mask" on a file holding fractions or negative values is not a label map.
3. **CT**: everything else, in greyscale with the model's HU window. DICOM is always a CT.

Registered methods are the registry's when torch is already loaded (the widget loads it), else
``medvit-explain list-methods --json`` run once in a subprocess (:func:`outputs.layout.known_methods`),
so opening a file never imports torch into napari; either is asked only when a name or description
could be an overlay's.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..outputs.layout import parse_overlay_name, volume_stem
from ..registry import NAME_PATTERN  # the registry module is light; reading the registry imports torch
from ..vocabulary import IMAGE_SUFFIXES, LABEL_NAME_WORDS, VOLUME_SUFFIXES

_DICOM_PROBE = 8  # files looked at when deciding whether a folder holds DICOM
_LABEL_NAME = re.compile(r"[_.-](" + "|".join(LABEL_NAME_WORDS) + r")$", re.IGNORECASE)
MAX_LABELS = 256  # distinct values (background included) a file of integers may hold to be read as labels
NIFTI_INTENT_LABEL = 1002
_SCAN_VOXELS = 1 << 22  # voxels checked per step when scanning a volume's values


@dataclass(frozen=True)
class Decision:
    """What a file is: ``kind`` (``"ct"``, ``"labels"`` or ``"overlay"``), why (``reason``, in words) and,
    for an overlay, its ``stem``, ``method`` and ``target``."""

    kind: str
    reason: str
    stem: str | None = None
    method: str | None = None
    target: str | None = None


@dataclass(frozen=True)
class HeaderInfo:
    """What a file's header says, read without its voxels (SimpleITK ``ReadImageInformation``)."""

    integer: bool  # the stored pixel type is an integer type (after any scaling the reader applies)
    description: str  # NIfTI ``descrip`` ("" for other formats)
    intent_code: int  # NIfTI ``intent_code`` (0 for other formats)


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


def read_volume_layers(path: str | os.PathLike | list) -> list:
    """``[Layer]``: the file as a CT, label or overlay layer (:func:`layer_data_tuples`); an overlay's
    colour bar is on. napari ≥ 0.5.5 accepts layers from a reader."""
    from ._layers import create_layer

    return [create_layer(t) for t in layer_data_tuples(path)]


def layer_data_tuples(path: str | os.PathLike | list) -> list[tuple]:
    """``[LayerDataTuple]`` for ``path``: loaded, reoriented to LPS axis codes, classified (:func:`classify`)."""
    from ..io import load_volume
    from ._layers import ct_layer_data, labels_layer_data, overlay_layer_data, reoriented_volume

    if isinstance(path, (list, tuple)):
        path = path[0]
    path = Path(path)
    source = load_volume(path)
    decision = classify(path, source)
    volume = reoriented_volume(source)
    extra = {"reason": decision.reason}
    if decision.kind == "overlay":
        name = f"{decision.stem} {decision.method}/{decision.target}"
        return [overlay_layer_data(volume, decision.method, decision.target, name=name, extra=extra)]
    if decision.kind == "labels":
        return [labels_layer_data(volume, extra=extra)]
    return [ct_layer_data(volume, extra=extra)]


def classify(path: str | os.PathLike, volume) -> Decision:
    """Overlay, label map or CT (the rules of the module docstring); ``volume`` is the loaded file."""
    path = Path(path)
    if path.is_dir() or not path.name.lower().endswith(VOLUME_SUFFIXES):
        return Decision("ct", "DICOM is read as a CT")
    header = read_header(path)
    overlay = overlay_decision(path, header)
    if overlay is not None:
        return overlay
    stem = volume_stem(path)
    named = _LABEL_NAME.search(stem)
    if named or header.intent_code == NIFTI_INTENT_LABEL or header.integer:
        limit = None if named or header.intent_code == NIFTI_INTENT_LABEL else MAX_LABELS
        values = label_values(volume.array, limit)
        if values is not None:
            why = (
                f"the name ends with {named.group(0)!r}"
                if named
                else "the NIfTI intent is label"
                if header.intent_code == NIFTI_INTENT_LABEL
                else f"integer voxels with {len(values)} distinct values"
            )
            return Decision("labels", f"label map: {why}")
        if named:
            return Decision("ct", f"CT: named like a label map ({named.group(0)!r}) but holds fractions or values < 0")
    return Decision("ct", "CT: neither an overlay nor a label map")


def overlay_decision(path: str | os.PathLike, header: HeaderInfo | None = None) -> Decision | None:
    """An overlay :class:`Decision` by the NIfTI description, else by the name and ``summary.json``; None
    when ``path`` is not an overlay."""
    path = Path(path)
    header = header or read_header(path)
    words = header.description.split()
    if len(words) == 2 and NAME_PATTERN.match(words[0]) and words[0] in method_names():
        method, target = words
        parsed = parse_overlay_name(path.name, [method], [target])
        stem = parsed[0] if parsed else volume_stem(path)
        return Decision("overlay", f"overlay: the NIfTI description is {header.description.strip()!r}", stem, *words)
    parsed = overlay_info(path)
    if parsed is not None:
        return Decision("overlay", "overlay: named <stem>_<method>_<target> beside summary.json", *parsed)
    return None


def overlay_info(path: str | os.PathLike) -> tuple[str, str, str] | None:
    """``(stem, method, target)`` when ``path`` is named like an overlay beside the CLI's ``summary.json``."""
    path = Path(path)
    summary = path.parent / "summary.json"
    if "_" not in path.name or not summary.is_file():
        return None
    try:
        targets = json.loads(summary.read_text()).get("targets") or None
    except (OSError, ValueError, AttributeError):
        targets = None
    return parse_overlay_name(path.name, method_names(), targets=targets)


def method_names() -> list[str]:
    """Registered method names, without importing torch into this process when it is not loaded yet."""
    if _torch_loaded():
        from ..registry import method_names as registered

        return registered()
    from ..outputs.layout import known_methods

    return known_methods()


def _torch_loaded() -> bool:
    return "torch" in sys.modules


def read_header(path: str | os.PathLike) -> HeaderInfo:
    """The header facts :func:`classify` uses, read without the voxels."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    integer = sitk.GetPixelIDValueAsString(reader.GetPixelID()).endswith("integer")

    def meta(key: str) -> str:
        return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else ""

    try:
        intent = int(float(meta("intent_code") or 0))
    except ValueError:
        intent = 0
    return HeaderInfo(integer, meta("descrip"), intent)


def label_values(array: np.ndarray, limit: int | None = MAX_LABELS) -> np.ndarray | None:
    """The distinct values of ``array`` when all are whole numbers ≥ 0 and (with ``limit``) at most
    ``limit`` of them; else None. Scanned in blocks of planes, stopping at the first block that fails (a
    CT's first block has air below 0): no full-size temporary."""
    if array.ndim != 3:
        raise ValueError(f"expected an [X, Y, Z] array, got shape {array.shape}")
    step = max(1, _SCAN_VOXELS // max(1, array.shape[0] * array.shape[1]))
    seen = np.zeros(0, dtype=np.int64)
    for k in range(0, array.shape[2], step):
        block = np.asarray(array[:, :, k : k + step])  # planes: contiguous in the loaded [X, Y, Z] layout
        if block.size == 0:
            continue
        if block.min() < 0 or not np.array_equal(block, np.floor(block)):
            return None
        ints = block.astype(np.int64).ravel()
        present = np.flatnonzero(np.bincount(ints)) if ints.max() < 1 << 20 else np.unique(ints)
        seen = np.union1d(seen, present)
        if limit is not None and len(seen) > limit:
            return None
    return seen


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
