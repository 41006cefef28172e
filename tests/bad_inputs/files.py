"""Small valid files the corpus starts from (a CT a few slices thick, as NIfTI and as a DICOM series)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvit_explain.volume import Volume

SHAPE = (40, 36, 5)
SPACING = (2.0, 2.0, 3.0)


def tiny_ct(shape=SHAPE, spacing=SPACING, seed: int = 0) -> Volume:
    """A small CT in HU: air outside a body ellipse, soft tissue inside, one bright nodule."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((x - shape[0] / 2) / (shape[0] * 0.42)) ** 2 + ((y - shape[1] / 2) / (shape[1] * 0.4)) ** 2 < 1
    array = np.where(body[..., None], 40.0, -1000.0) + rng.normal(0, 10, (*shape,))
    array[shape[0] // 2 - 2 : shape[0] // 2 + 2, shape[1] // 2 - 2 : shape[1] // 2 + 2, :] = 120.0
    return Volume(
        np.round(array).astype(np.float32),
        np.array([-40.0, -36.0, 10.0]),
        np.array(spacing, dtype=np.float64),
        np.eye(3),
        {"modality": "CT"},
    )


def nifti(folder: Path, name: str = "ct.nii.gz", volume: Volume | None = None) -> Path:
    from medvit_explain.io import write_volume

    return write_volume(volume or tiny_ct(), Path(folder) / name, dtype=np.int16)


def dicom_series(folder: Path, volume: Volume | None = None, **kwargs) -> list[Path]:
    from medvit_explain.io.dicom_series import write_ct_series

    return write_ct_series(volume or tiny_ct(), folder, uid_seed=str(folder), **kwargs)
