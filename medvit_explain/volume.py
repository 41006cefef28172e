"""The ``Volume``: a CT in Hounsfield units with its exact geometry.

Convention (the one ITK / SimpleITK / DICOM use): physical coordinates are **LPS** millimetres, and
voxel index ``(i, j, k)`` of ``array`` (shape ``[X, Y, Z]``, i fastest in the file) sits at

    p = origin + direction @ (spacing * [i, j, k])

``direction`` holds the unit axis directions as **columns** (``direction[:, 0]`` is the i axis).
``affine_lps`` is the 4 × 4 matrix of that map; ``affine_ras`` is the same grid in the RAS convention
NIfTI / nibabel / MONAI use (x and y negated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D CT volume.

    Attributes:
        array: float32 ``[X, Y, Z]`` voxel values in HU.
        origin: ``(3,)`` LPS position (mm) of voxel ``(0, 0, 0)``.
        spacing: ``(3,)`` voxel size (mm) along i, j, k.
        direction: ``(3, 3)`` axis directions as columns, LPS.
        metadata: source information: ``path``, ``format``, ``modality`` and, for DICOM, the study /
            series / frame-of-reference UIDs, patient and study attributes and the SOP instances
            (``dicom_instances``: list of ``(sop_class_uid, sop_instance_uid)`` in slice order).
    """

    array: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def affine_lps(self) -> np.ndarray:
        a = np.eye(4)
        a[:3, :3] = self.direction * self.spacing[None, :]
        a[:3, 3] = self.origin
        return a

    @property
    def affine_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.affine_lps

    @property
    def modality(self) -> str:
        return str(self.metadata.get("modality", "CT"))

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """``[..., 3]`` continuous voxel indices → ``[..., 3]`` LPS mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return self.origin + (ijk * self.spacing) @ self.direction.T

    def physical_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """``[..., 3]`` LPS mm → ``[..., 3]`` continuous voxel indices."""
        xyz = np.asarray(xyz, dtype=np.float64)
        return ((xyz - self.origin) @ np.linalg.inv(self.direction).T) / self.spacing

    def with_array(self, array: np.ndarray, **metadata: Any) -> Volume:
        """A new volume on the same grid holding ``array`` (same ``[X, Y, Z]`` shape)."""
        array = np.asarray(array)
        if array.shape[:3] != self.shape:
            raise ValueError(f"expected an array of shape {self.shape}, got {array.shape}")
        return Volume(
            array, self.origin.copy(), self.spacing.copy(), self.direction.copy(), {**self.metadata, **metadata}
        )

    def same_grid(self, other: Volume, atol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )
