"""Synthetic chest-CT phantoms with lung nodules: the project's ground truth.

Deterministic for a seed: the same arguments give the same phantom and byte-identical files.

* :mod:`.anatomy`: the voxel grid in LPS mm, body, lungs, airways, fissures, heart, spine, ribs, vessels,
  CT noise.
* :mod:`.nodules`: nodule attributes (LIDC-IDRI biomarkers), the malignancy rule, shapes, drawing, placing,
  feature labels (``FEATURE_LABELS``).
* :mod:`.generate`: ``generate_phantom`` and the ``Phantom`` it returns.
* :mod:`.labels`: per-slice labels (``slice_labels``), the labels JSON, reading nodule masks.
* :mod:`.writers`: writing phantoms as NIfTI / DICOM (``write_phantom``), sets of them (``make_phantoms``).
"""

from .anatomy import AIR, BLOOD, BONE_CORTEX, BONE_MARROW, CARTILAGE, FAT, LUNG, MUSCLE, SOFT
from .generate import DEFAULT_SIZE, DEFAULT_SPACING, GENERATOR_VERSION, GENERATOR_VERSIONS, Phantom, generate_phantom
from .labels import slice_labels
from .nodules import (
    BIOMARKER_KEYS,
    FEATURE_LABELS,
    MALIGNANCY_THRESHOLD,
    NODULE_KEYS,
    malignancy_rule,
    malignancy_score,
)
from .nodules import _sample_attributes as _sample_attributes  # used by the tests
from .writers import make_phantom_groups, make_phantoms, phantom_seed, write_phantom

__all__ = [
    "AIR",
    "BIOMARKER_KEYS",
    "BLOOD",
    "BONE_CORTEX",
    "BONE_MARROW",
    "CARTILAGE",
    "DEFAULT_SIZE",
    "DEFAULT_SPACING",
    "FAT",
    "FEATURE_LABELS",
    "GENERATOR_VERSION",
    "GENERATOR_VERSIONS",
    "LUNG",
    "MALIGNANCY_THRESHOLD",
    "MUSCLE",
    "NODULE_KEYS",
    "Phantom",
    "SOFT",
    "generate_phantom",
    "make_phantom_groups",
    "make_phantoms",
    "malignancy_rule",
    "malignancy_score",
    "phantom_seed",
    "slice_labels",
    "write_phantom",
]
