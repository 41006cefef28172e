"""``generate_phantom``: one synthetic chest CT with its nodule, feature and lung masks (the ``Phantom``).

The anatomy comes from :mod:`.anatomy`, the nodules from :mod:`.nodules`; each uses its own random
stream spawned from the seed, so the same arguments give the same phantom, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from ..vocabulary import PHANTOM_GENERATOR_VERSIONS
from ..volume import Volume
from .anatomy import BLOOD, _anatomy, _ct_noise, _fissures, _Grid, _vessels
from .nodules import BIOMARKER_KEYS, GRADES, _place_nodules

GENERATOR_VERSIONS = PHANTOM_GENERATOR_VERSIONS  # every version generate_phantom draws (GRADES' keys)
GENERATOR_VERSION = GENERATOR_VERSIONS[0]  # the default
DEFAULT_SIZE = (256, 256, 64)
DEFAULT_SPACING = (1.4, 1.4, 2.5)


# --------------------------------------------------------------------------- data classes


@dataclass
class Phantom:
    """A synthetic chest CT and its ground truth.

    Attributes:
        ct: float32 ``[X, Y, Z]`` HU (integer values, so int16 / DICOM storage is exact).
        nodule_mask: int16 instance ids (0 background, ``1 … n`` = ``nodules[i]["id"]``).
        lung_mask: uint8 1 inside the lungs (vessels, fissures and nodules included, airways not).
        features: uint8 feature labels of the nodules' voxels, nonzero exactly on ``nodule_mask > 0``:
            1 solid core, 2 spicules, 3 lobulation, 4 calcification, 5 ground glass (``FEATURE_LABELS``;
            see :mod:`.nodules` for how each is drawn and the precedence where they overlap). No vessel
            is drawn on a labelled voxel.
        nodules: one dict per nodule with exactly the keys ``NODULE_KEYS``; ``center_mm`` is the LPS
            centroid of the nodule's mask, ``diameter_mm`` the volume-equivalent sphere diameter of it,
            ``feature_voxels`` its voxel count per feature label (``{"core": n, "spicules": n, …}``).
        seed, label_noise: the generator's arguments.
        info: ``size``, ``spacing`` and ``carina_mm`` (LPS position of the carina; the trachea runs
            cranially from it, parallel to z).
    """

    ct: Volume
    nodule_mask: Volume
    lung_mask: Volume
    features: Volume
    nodules: list[dict[str, Any]]
    seed: int = 0
    label_noise: float = 0.0
    generator_version: str = GENERATOR_VERSION
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- public API


def generate_phantom(
    seed: int,
    *,
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    n_nodules: int | None = None,
    label_noise: float = 0.0,
    direction: np.ndarray | Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    noise_hu: float = 18.0,
    nodule_attributes: Sequence[Mapping[str, Any]] | None = None,
    generator_version: str = GENERATOR_VERSION,
) -> Phantom:
    """A synthetic chest CT with 0-3 lung nodules, deterministic for ``seed``.

    Args:
        seed: any non-negative int; the same arguments give the same phantom, bit for bit.
        size: ``(X, Y, Z)`` voxels.
        spacing: ``(sx, sy, sz)`` mm. The default 1.4 × 1.4 × 2.5 mm gives a 358 × 358 × 160 mm field
            of view at the default size (a 512² clinical slice at 0.7 mm, halved).
        n_nodules: number of nodules (``None``: uniform 0-3). A nodule that cannot be placed fully
            inside the lungs is dropped, so fewer may come back for tiny grids.
        label_noise: probability of flipping each nodule's malignancy label.
        direction: ``(3, 3)`` orthonormal axis directions as columns (LPS); default identity.
        origin: LPS position of voxel ``(0, 0, 0)``; default centres the field of view on ``(0, 0, 0)``.
        noise_hu: standard deviation of the image noise (HU).
        nodule_attributes: per nodule, attributes that replace the sampled ones (any of
            ``BIOMARKER_KEYS``; ``diameter_mm`` is the target size, the drawn size is measured); with
            ``n_nodules=None`` there are ``len(nodule_attributes)`` nodules. The malignancy label still
            follows ``malignancy_rule``.
        generator_version: ``"2.0"`` (phantoms v2, the default) or ``"2.1"``: the same anatomy and nodule
            parts, with the shape grades drawn so each is a visible step at the grid (``GRADES`` in
            :mod:`.nodules`: sphericity 1.0-2.8 axis ratio, lobulation steps of at least half an in-plane
            voxel, margin blur 1.0-4.2 mm), or ``"2.2"``: 2.1 with lobulation steps of at least 1 mm on any grid.
            Recorded in the CT's metadata and the labels JSON.

    Returns:
        A ``Phantom`` (CT, nodule instance mask, lung mask, feature labels, nodule attribute dicts).
    """
    size, spacing_arr, d, o = _grid_arguments(size, spacing, label_noise, direction, origin)
    if generator_version not in GRADES:
        raise ValueError(f"expected generator_version one of {', '.join(GRADES)}, got {generator_version!r}")
    overrides = _attribute_overrides(nodule_attributes)
    if n_nodules is None and overrides:
        n_nodules = len(overrides)

    ss = np.random.SeedSequence(int(seed))
    rng_anat, rng_nod, rng_noise, rng_label = (np.random.default_rng(c) for c in ss.spawn(4))
    grid = _Grid(size, spacing_arr, d, o)
    hu, lungs, info = _anatomy(grid, rng_anat)
    # partial volume: blur the hard-edged anatomy in plane (and a little along z)
    sig = np.clip(0.5 / spacing_arr * spacing_arr.min(), 0.25, 0.6)
    hu = ndimage.gaussian_filter(hu, sigma=sig, mode="nearest", truncate=3.0)
    _fissures(hu, grid, lungs, info, rng_anat)
    vessels = _vessels(grid, lungs, info, rng_anat)

    if n_nodules is None:
        n_nodules = int(rng_nod.integers(0, 4))
    mask, features, nodule_occ, nodules = _place_nodules(
        grid, hu, lungs, int(n_nodules), rng_nod, overrides, GRADES[generator_version]
    )
    # vessels pass beside nodules, never through them: the feature labels stay the nodules' ground truth
    vessels *= 1.0 - nodule_occ
    vessels[mask > 0] = 0.0
    hu += vessels * (np.float32(BLOOD) - hu)
    if label_noise > 0:
        for nod in nodules:
            if rng_label.random() < label_noise:
                nod["malignancy"] = 1 - nod["malignancy"]

    # CT noise: white noise, slightly correlated in plane
    hu += _ct_noise(rng_noise, size, noise_hu)
    np.rint(hu, out=hu)
    np.clip(hu, -1024.0, 3071.0, out=hu)

    meta = {"format": "phantom", "modality": "CT", "seed": int(seed), "generator_version": generator_version}
    ct = Volume(hu.astype(np.float32, copy=False), o, spacing_arr, d, dict(meta))
    return Phantom(
        ct=ct,
        nodule_mask=ct.with_array(mask, kind="nodule_mask"),
        lung_mask=ct.with_array(lungs.astype(np.uint8), kind="lung_mask"),
        features=ct.with_array(features, kind="nodule_features"),
        nodules=nodules,
        seed=int(seed),
        label_noise=float(label_noise),
        generator_version=generator_version,
        info={
            "size": list(size),
            "spacing": spacing_arr.tolist(),
            "carina_mm": [round(float(v), 3) for v in info["carina"] + grid.center],
        },
    )


def _attribute_overrides(nodule_attributes: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Checked per-nodule attribute overrides of ``generate_phantom`` (ints, ``diameter_mm`` a float)."""
    if nodule_attributes is None:
        return []
    out = []
    for attrs in nodule_attributes:
        unknown = sorted(set(attrs) - set(BIOMARKER_KEYS))
        if unknown:
            raise ValueError(f"expected nodule attributes from {', '.join(BIOMARKER_KEYS)}, got {unknown}")
        clean: dict[str, Any] = {}
        for key, value in attrs.items():
            if key == "diameter_mm":
                if not 1.0 <= float(value) <= 60.0:
                    raise ValueError(f"expected diameter_mm in [1, 60], got {value}")
                clean[key] = float(value)
                continue
            hi = 6 if key == "calcification" else 5
            if int(value) != value or not 1 <= int(value) <= hi:
                raise ValueError(f"expected {key} an integer in 1..{hi}, got {value!r}")
            clean[key] = int(value)
        out.append(clean)
    return out


def _grid_arguments(
    size: Sequence[int],
    spacing: Sequence[float],
    label_noise: float,
    direction: np.ndarray | Sequence[float] | None,
    origin: Sequence[float] | None,
) -> tuple[tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(size, spacing, direction, origin)`` arrays of ``generate_phantom``'s arguments."""
    size = tuple(int(v) for v in size)
    spacing_arr = np.asarray(spacing, dtype=np.float64).reshape(3)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"expected size as 3 positive ints (X, Y, Z), got {size}")
    if np.any(spacing_arr <= 0):
        raise ValueError(f"expected 3 positive spacings (mm), got {spacing_arr.tolist()}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"expected label_noise in [0, 1], got {label_noise}")
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
        raise ValueError(f"expected an orthonormal direction matrix, got {d.tolist()}")
    if origin is None:
        o = -(d @ (spacing_arr * (np.asarray(size) - 1) / 2.0))
    else:
        o = np.asarray(origin, dtype=np.float64).reshape(3)
    return size, spacing_arr, d, o
