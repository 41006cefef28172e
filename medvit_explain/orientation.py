"""Reorientation to LPS axis codes: the permutation and flips of the voxel axes that make a CT's axes run
to patient left, posterior and superior (``nibabel.orientations``, the maths MONAI's ``Orientation``
uses), applied as numpy views. numpy and nibabel only: the model-input chain
(:mod:`medvit_explain.transforms`), the MONAI transforms and the napari reader (which never imports torch)
all reorient with these functions."""

from __future__ import annotations

import nibabel.orientations as nio
import numpy as np

from .volume import Volume

CANONICAL_AXCODES = ("L", "P", "S")  # LPS axis codes: the ITK/DICOM patient frame


def orientation_of(volume: Volume) -> np.ndarray:
    """nibabel ``ornt`` ([3, 2]: source axis, flip) taking the volume's axes to LPS codes."""
    return ornt_from_affine_ras(volume.affine_ras)


def ornt_from_affine_ras(affine_ras: np.ndarray) -> np.ndarray:
    """nibabel ``ornt`` taking the axes of an image with this RAS affine (4 × 4) to LPS codes."""
    # io_orientation works in RAS; the RAS affine gives the axis codes in RAS terms.
    current = nio.io_orientation(np.asarray(affine_ras, dtype=np.float64))
    return nio.ornt_transform(current, nio.axcodes2ornt(CANONICAL_AXCODES))


def reoriented_view(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """A view of ``array`` (first 3 axes spatial) in the canonical orientation (no copy)."""
    out = array
    for axis, (_, flip) in enumerate(ornt):
        if flip == -1:
            out = np.flip(out, axis=axis)
    order = [int(a) for a in ornt[:, 0]]
    inverse = np.argsort(order)  # ornt[i, 0] says where source axis i goes
    return out.transpose(*inverse, *range(3, array.ndim))
