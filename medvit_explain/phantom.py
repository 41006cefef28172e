"""Synthetic chest-CT phantoms with lung nodules: the project's ground truth.

A phantom is a chest-like CT in HU on an exact grid (any spacing, direction and origin) with:
air outside the body (-1000), a body outline that changes slowly along z, subcutaneous fat, chest-wall
muscle, two lungs (about -850, denser posteriorly) with branching vessels, a heart, a descending aorta,
mediastinal fat, a trachea, vertebrae (cortical shell, discs, posterior arch), ribs with costal
cartilage, a sternum, CT-like noise, and 0-3 nodules fully inside the lungs.

Anatomy is laid out in **physical LPS millimetres** around the centre of the field of view (x to the
patient's left, y posterior, z superior), so an oblique or flipped grid shows the same patient, as a
scanner would. In-plane sizes scale down when the field of view is smaller than an adult chest.

Each nodule is drawn from LIDC-IDRI attributes (``diameter_mm`` 4-30, ``subtlety`` 1-5,
``calcification`` 1-6 with 6 = absent, ``margin`` 1-5 with 5 = sharp, ``lobulation`` 1-5,
``spiculation`` 1-5, ``texture`` 1-5 with 5 = solid, ``sphericity`` 1-5 with 5 = round) and each
attribute changes the image:

* diameter: size. The reported ``diameter_mm`` is measured on the drawn mask (volume-equivalent
  sphere diameter), so it is the real drawn size.
* sphericity: elongation (long / short axis 1.0 … 1.9, volume preserved), random orientation.
* lobulation: smooth bumps of the surface (radial function of direction).
* spiculation: narrow spikes of the surface, more and longer with the score.
* margin: width of the blurred edge (5 = sharp, 1 = about 3.5 mm of blur).
* texture: density: 1 pure ground glass (about -620 HU), 3 part-solid (solid core inside ground
  glass), 5 solid (about +30 HU).
* calcification: 1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central bright deposits
  (600-900 HU); 6 none.
* subtlety: contrast against the lung (1 = 40 %, 5 = 100 %).

Malignancy (0/1) follows :func:`malignancy_rule`; ``label_noise`` flips it with a small probability.
Attributes are drawn from two overlapping profiles (suspicious / benign-looking), so about half of the
nodules come out malignant and malignant nodules are, on average, large, spiculated and lobulated,
while benign ones are small, smooth, round and often calcified.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .volume import Volume

__all__ = [
    "GENERATOR_VERSION",
    "NODULE_KEYS",
    "Phantom",
    "generate_phantom",
    "make_phantoms",
    "malignancy_rule",
    "malignancy_score",
    "phantom_seed",
    "slice_labels",
    "write_phantom",
]

GENERATOR_VERSION = "1.0"
NODULE_KEYS = (
    "id",
    "center_mm",
    "diameter_mm",
    "malignancy",
    "subtlety",
    "calcification",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "sphericity",
)
BIOMARKER_KEYS = (
    "subtlety",
    "calcification",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "sphericity",
    "diameter_mm",
)
DEFAULT_SIZE = (256, 256, 64)
DEFAULT_SPACING = (1.4, 1.4, 2.5)

AIR, LUNG, FAT, SOFT, MUSCLE, BLOOD = -1000.0, -850.0, -95.0, 40.0, 55.0, 42.0
BONE_CORTEX, BONE_MARROW, CARTILAGE = 700.0, 230.0, 130.0
MALIGNANCY_THRESHOLD = 3.0


# --------------------------------------------------------------------------- malignancy


def malignancy_score(attrs: Mapping[str, Any]) -> float:
    """Risk score of a nodule from its attributes (higher = more suspicious); see ``malignancy_rule``."""
    d = float(attrs["diameter_mm"])
    score = float(np.clip((d - 10.0) / 5.0, -1.5, 3.0))  # Fleischner-like size bands
    score += 0.75 * (int(attrs["spiculation"]) - 1)  # 0 … 3
    score += 0.5 * (int(attrs["lobulation"]) - 1)  # 0 … 2
    score += 0.3 * (5 - int(attrs["margin"]))  # poorly defined margin: 0 … 1.2
    score += 0.2 * (5 - int(attrs["sphericity"]))  # irregular shape: 0 … 0.8
    score += {1: 0.0, 2: 0.75, 3: 1.5, 4: 0.75, 5: 0.0}[int(attrs["texture"])]  # part-solid
    if int(attrs["calcification"]) != 6:  # benign calcification pattern
        score -= 4.0
    return score


def malignancy_rule(attrs: Mapping[str, Any]) -> int:
    """1 (malignant) or 0 (benign) from a nodule's attributes; the phantoms' ground-truth rule.

    A plausible, documented stand-in for the radiologists' median rating (LIDC > 3 malignant), after the
    features the Fleischner / Lung-RADS guidance and the LIDC literature associate with malignancy:

        score = clip((diameter_mm - 10) / 5, -1.5, 3)      size (4 mm: -1.2, 10 mm: 0, 25 mm: +3)
              + 0.75 · (spiculation - 1)                    0 … 3
              + 0.5  · (lobulation - 1)                     0 … 2
              + 0.3  · (5 - margin)                         ill-defined margin, 0 … 1.2
              + 0.2  · (5 - sphericity)                     irregular shape, 0 … 0.8
              + {1: 0, 2: 0.75, 3: 1.5, 4: 0.75, 5: 0}[texture]   part-solid is the most suspicious
              - 4 if calcification != 6                     any calcification pattern is benign

    malignant ⇔ score ≥ 3. The score never decreases with size, spiculation or lobulation, never
    increases with margin sharpness or roundness, and calcification always lowers it.
    """
    return int(malignancy_score(attrs) >= MALIGNANCY_THRESHOLD)


# --------------------------------------------------------------------------- data classes


@dataclass
class Phantom:
    """A synthetic chest CT and its ground truth.

    Attributes:
        ct: float32 ``[X, Y, Z]`` HU (integer values, so int16 / DICOM storage is exact).
        nodule_mask: int16 instance ids (0 background, ``1 … n`` = ``nodules[i]["id"]``).
        lung_mask: uint8 1 inside the lungs (vessels and nodules included).
        nodules: one dict per nodule with exactly the keys ``NODULE_KEYS``; ``center_mm`` is the LPS
            centroid of the nodule's mask, ``diameter_mm`` the volume-equivalent sphere diameter of it.
        seed, label_noise: the generator's arguments.
    """

    ct: Volume
    nodule_mask: Volume
    lung_mask: Volume
    nodules: list[dict[str, Any]]
    seed: int = 0
    label_noise: float = 0.0
    generator_version: str = GENERATOR_VERSION
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- geometry helpers


class _Grid:
    """Physical LPS coordinates relative to the FOV centre, as broadcastable float32 arrays.

    ``x``, ``y``, ``z`` have shapes that broadcast to ``[X, Y, Z]``; for an axis-aligned grid they stay
    1D-like (e.g. ``[X, 1, 1]``), which keeps the per-voxel work small.
    """

    def __init__(self, shape, spacing, direction, origin):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.direction = np.asarray(direction, dtype=np.float64)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.center = self.origin + self.direction @ (self.spacing * (np.asarray(self.shape) - 1) / 2.0)
        idx = [np.arange(n, dtype=np.float64) for n in self.shape]
        shapes = [(-1, 1, 1), (1, -1, 1), (1, 1, -1)]
        self.coords = []
        for axis in range(3):
            c = np.float32(self.origin[axis] - self.center[axis])
            acc = np.full((1, 1, 1), c, dtype=np.float32)
            for a in range(3):
                coef = self.direction[axis, a] * self.spacing[a]
                if abs(coef) > 1e-12:
                    acc = acc + (coef * idx[a]).astype(np.float32).reshape(shapes[a])
            self.coords.append(acc)
        self.x, self.y, self.z = self.coords
        # physical extents (mm) of the FOV along the patient axes, from the 8 corners
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)
        pts = (corners * (np.asarray(self.shape) - 1) * self.spacing) @ self.direction.T
        self.extent = pts.max(0) - pts.min(0)
        # extent of the inscribed axis-aligned region (conservative for oblique grids)
        self.half_inplane = 0.5 * min(self.shape[0] * self.spacing[0], self.shape[1] * self.spacing[1])
        self.half_z = 0.5 * self.shape[2] * self.spacing[2]

    def full(self, a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a, self.shape)

    def to_index(self, p_rel: np.ndarray) -> np.ndarray:
        """``[..., 3]`` mm relative to the FOV centre → continuous indices."""
        p = np.asarray(p_rel, dtype=np.float64) + self.center - self.origin
        return (p @ self.direction) / self.spacing  # direction is orthonormal

    def box(self, p_rel: np.ndarray, radius: float) -> tuple[slice, slice, slice] | None:
        """Index box holding the ball of ``radius`` mm around ``p_rel`` (None if it leaves the grid)."""
        c = self.to_index(p_rel)
        r = np.abs(self.direction).T @ np.full(3, radius) / self.spacing
        lo = np.floor(c - r).astype(int)
        hi = np.ceil(c + r).astype(int) + 1
        if np.any(lo < 0) or np.any(hi > np.asarray(self.shape)):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))

    def box_clipped(self, lo_mm: np.ndarray, hi_mm: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box of the mm box ``[lo_mm, hi_mm]`` (relative coords), clipped to the grid."""
        corners = np.array(
            [[a, b, c] for a in (lo_mm[0], hi_mm[0]) for b in (lo_mm[1], hi_mm[1]) for c in (lo_mm[2], hi_mm[2])]
        )
        idx = self.to_index(corners)
        lo = np.maximum(np.floor(idx.min(0)).astype(int), 0)
        hi = np.minimum(np.ceil(idx.max(0)).astype(int) + 1, np.asarray(self.shape))
        if np.any(hi <= lo):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))

    def sub(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Full ``x, y, z`` arrays of the voxels in ``box``."""
        out = []
        for c in self.coords:
            sl = tuple(s if c.shape[a] > 1 else slice(None) for a, s in enumerate(box))
            out.append(np.broadcast_to(c[sl], tuple(s.stop - s.start for s in box)))
        return tuple(out)  # type: ignore[return-value]


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], -1)


def _random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# --------------------------------------------------------------------------- anatomy


def _anatomy(grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Hard-edged anatomy: (HU float32 [X,Y,Z], lung mask bool, layout parameters)."""
    x, y, z = grid.x, grid.y, grid.z
    s = min(1.0, 0.9 * grid.half_inplane / 170.0)  # in-plane scale: adult chest in a >= 380 mm FOV
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    A0, B0 = 165.0 * s * u(0.92, 1.05), 112.0 * s * u(0.92, 1.05)
    hz = max(grid.half_z, 40.0)
    # body semi-axes vary slowly along z: a taper towards the apex and a gentle undulation
    phase, period = u(0, 2 * np.pi), u(150, 260)
    taper = np.float32(u(0.0006, 0.0012))
    wave = np.sin(np.float32(2 * np.pi / period) * z + np.float32(phase))
    zf = 1.0 - taper * z + np.float32(0.025) * wave
    a = (A0 * zf).astype(np.float32)
    b = (B0 * zf).astype(np.float32)
    yc = np.float32(u(-5, 5) * s)
    b_eff = np.where(y - yc > 0, b * np.float32(0.9), b)  # flatter back (patient on the table)
    rho_body = np.sqrt((x / a) ** 2 + ((y - yc) / b_eff) ** 2)
    body = rho_body <= 1.0
    fat_t = u(6, 18) * s
    muscle_t = u(9, 14) * s
    rho_fat_in = 1.0 - fat_t / A0
    rho_mus_in = 1.0 - (fat_t + muscle_t) / A0

    hu = np.full(grid.shape, AIR, dtype=np.float32)
    hu[grid.full(body)] = FAT
    hu[grid.full(rho_body <= rho_fat_in)] = MUSCLE
    inner = rho_body <= rho_mus_in
    hu[grid.full(inner)] = SOFT

    # lungs: two ellipses per slice, shrinking towards the ends of the covered z range
    lungs = np.zeros(grid.shape, dtype=bool)
    lz = hz * u(1.25, 1.5) + 20.0
    zc_l = np.float32(u(-0.15, 0.1) * hz)
    g = np.sqrt(np.clip(1.0 - ((z - zc_l) / np.float32(lz)) ** 2, 0.0, 1.0)).astype(np.float32)
    heart_c = np.array([0.12 * A0 * u(0.7, 1.3), -0.28 * B0 * u(0.85, 1.1)])
    heart_ax = np.array([0.36 * A0 * u(0.9, 1.1), 0.40 * B0 * u(0.9, 1.1)])
    # the heart sits low: present in the inferior part, shrinking superiorly
    hz0 = np.float32(-0.35 * hz + u(-10, 10))
    hg = np.sqrt(np.clip(1.0 - ((z - hz0) / np.float32(0.9 * hz + 30.0)) ** 2, 0.0, 1.0))
    heart = ((x - heart_c[0]) / (heart_ax[0] * hg + 1e-3)) ** 2 + (
        (y - yc - heart_c[1]) / (heart_ax[1] * hg + 1e-3)
    ) ** 2 <= 1.0
    heart_pad = ((x - heart_c[0]) / (heart_ax[0] * hg + 8 * s)) ** 2 + (
        (y - yc - heart_c[1]) / (heart_ax[1] * hg + 8 * s)
    ) ** 2 <= 1.0
    spine_c = np.array([0.0, 0.66 * B0])
    vert_r = 19.0 * s * u(0.9, 1.1)
    lung_params = []
    for side in (-1.0, 1.0):  # -1: patient right, +1: patient left
        cx = side * 0.47 * A0 * u(0.95, 1.05)
        cy = -0.02 * B0 + u(-4, 4) * s
        lx = 0.35 * A0 * u(0.93, 1.05)
        ly = 0.70 * B0 * u(0.93, 1.05)
        ell = ((x - np.float32(cx)) / (np.float32(lx) * g + 1e-3)) ** 2 + (
            (y - yc - np.float32(cy)) / (np.float32(ly) * g + 1e-3)
        ) ** 2 <= 1.0
        lungs |= ell
        lung_params.append((cx, cy, lx, ly))
    mediast = np.abs(x - np.float32(0.02 * A0)) < np.float32(0.10 * A0)
    spine_pad = (x - spine_c[0]) ** 2 + (y - yc - spine_c[1]) ** 2 <= (vert_r + 14 * s) ** 2
    lungs &= ~(heart_pad | mediast | spine_pad)
    lungs &= grid.full(rho_body <= rho_mus_in - 6 * s / A0)

    # mediastinal fat, heart, aorta
    med_fat = inner & (np.abs(x) < np.float32(0.28 * A0)) & (y - yc < np.float32(0.5 * B0))
    hu[grid.full(med_fat)] = FAT * 0.85
    hu[grid.full(heart)] = BLOOD + 8.0
    ao_c = (0.17 * A0 + u(-4, 4) * s, 0.42 * B0 + u(-4, 4) * s)
    ao_r = 12.0 * s * u(0.85, 1.15)
    aorta = (x - np.float32(ao_c[0])) ** 2 + (y - yc - np.float32(ao_c[1])) ** 2 <= ao_r**2
    hu[grid.full(aorta)] = BLOOD
    # trachea above a carina level, a soft-tissue wall around air
    carina = np.float32(u(0.1, 0.45) * hz)
    tr_c = (u(-3, 3) * s, -0.02 * B0)
    tr_d2 = (x - np.float32(tr_c[0])) ** 2 + (y - yc - np.float32(tr_c[1])) ** 2
    above = z > carina
    hu[grid.full(above & (tr_d2 <= (11.0 * s) ** 2))] = SOFT
    hu[grid.full(above & (tr_d2 <= (9.0 * s) ** 2))] = AIR

    # lungs: parenchyma denser posteriorly (gravity); vessels and nodules come later
    lung_hu = (LUNG - 10.0 + 55.0 * np.clip((y - yc) / np.float32(B0), -1.0, 1.0)).astype(np.float32)
    hu = np.where(lungs, lung_hu, hu)

    # spine: vertebral body (shell + marrow) with discs, canal, posterior arch and spinous process
    sd2 = (x - spine_c[0]) ** 2 + (y - yc - np.float32(spine_c[1])) ** 2
    vpitch, vphase = u(26, 30), u(0, 30)
    disc = np.mod(z + np.float32(vphase), np.float32(vpitch)) < np.float32(5.0)
    vb = sd2 <= vert_r**2
    hu[grid.full(vb & ~disc)] = BONE_CORTEX
    hu[grid.full((sd2 <= (vert_r - 3.0 * s) ** 2) & ~disc)] = BONE_MARROW
    hu[grid.full(vb & disc)] = 85.0
    canal_y = spine_c[1] + vert_r + 9.0 * s
    cd2 = x**2 + (y - yc - np.float32(canal_y)) ** 2
    hu[grid.full(cd2 <= (14.0 * s) ** 2)] = BONE_CORTEX * 0.85
    hu[grid.full(cd2 <= (8.0 * s) ** 2)] = 25.0
    spinous = (
        (np.abs(x) < np.float32(4.0 * s))
        & (y - yc > np.float32(canal_y + 12 * s))
        & (y - yc < np.float32(canal_y + 34 * s))
        & ~disc
    )
    hu[grid.full(spinous & body)] = BONE_CORTEX * 0.8

    # ribs: inclined bands in a shell inside the chest wall, dropping anteriorly; costal cartilage
    theta = np.abs(np.arctan2(x, y - yc))  # 0 posterior, pi anterior
    rib_in = rho_mus_in - 2.0 * s / A0
    rib_out = rho_mus_in + 7.0 * s / A0
    shell = (rho_body >= rib_in) & (rho_body <= rib_out)
    rpitch, rphase, slope = u(26, 32), u(0, 32), u(22, 30)
    band = np.mod(z + np.float32(slope) * theta + np.float32(rphase), np.float32(rpitch)) < np.float32(9.0)
    ribs = shell & band & (theta > 0.22) & (theta < 2.75)
    cart = theta > 2.3
    hu[grid.full(ribs & ~cart)] = BONE_CORTEX * 0.9
    hu[grid.full(ribs & cart)] = CARTILAGE
    sternum = (np.abs(x) < np.float32(13 * s)) & (rho_body >= rib_in) & (rho_body <= rib_out + 0.02) & (theta > 2.95)
    hu[grid.full(sternum)] = BONE_MARROW + 150.0

    info = {"scale": s, "A0": A0, "B0": B0, "yc": float(yc), "lungs": lung_params, "hilum_z": float(zc_l) + u(-10, 10)}
    return hu, grid.full(lungs).copy(), info


def _segment_occupancy(px, py, pz, p0, p1, r0, r1, soft):
    """Soft occupancy of a tapered tube from p0 (radius r0) to p1 (radius r1) at points (px,py,pz)."""
    d = np.asarray(p1, dtype=np.float32) - np.asarray(p0, dtype=np.float32)
    L2 = float(d @ d) + 1e-9
    qx, qy, qz = px - np.float32(p0[0]), py - np.float32(p0[1]), pz - np.float32(p0[2])
    t = np.clip((qx * d[0] + qy * d[1] + qz * d[2]) / np.float32(L2), 0.0, 1.0)
    dist = np.sqrt((qx - t * d[0]) ** 2 + (qy - t * d[1]) ** 2 + (qz - t * d[2]) ** 2)
    r = np.float32(r0) + (np.float32(r1) - np.float32(r0)) * t
    return np.clip(0.5 + (r - dist) / np.float32(soft), 0.0, 1.0)


def _vessels(grid: _Grid, lungs: np.ndarray, info: dict, rng: np.random.Generator) -> np.ndarray:
    """Soft occupancy [X,Y,Z] of branching pulmonary vessel trees (one per lung), masked to the lungs."""
    occ = np.zeros(grid.shape, dtype=np.float32)
    s = info["scale"]
    soft = float(min(grid.spacing[:2].min(), 1.2))
    segments = []
    for cx, cy, lx, _ly in info["lungs"]:
        side = np.sign(cx)
        hilum = np.array([cx - side * 0.55 * lx, info["yc"] + cy + 5 * s, info["hilum_z"]])
        roots = [
            np.array([side * 0.7, 0.0, 0.7]),
            np.array([side * 1.0, -0.3, 0.0]),
            np.array([side * 0.6, 0.5, -0.6]),
            np.array([side * 0.6, -0.6, -0.5]),
            np.array([side * 0.8, 0.5, 0.3]),
        ]
        stack = [(hilum, v / np.linalg.norm(v), 40.0 * s, 4.0 * s, 0) for v in roots]
        while stack:
            p0, v, length, r, gen = stack.pop()
            v = v + 0.25 * rng.standard_normal(3)
            v /= np.linalg.norm(v)
            p1 = p0 + v * length * rng.uniform(0.8, 1.2)
            r1 = r * 0.78
            segments.append((p0, p1, r, r1))
            if gen < 4:
                for _ in range(2):
                    w = v + 0.7 * _random_unit(rng, 1)[0]
                    stack.append((p1, w / np.linalg.norm(w), length * 0.72, max(r1 * 0.85, 0.5), gen + 1))
    for p0, p1, r0, r1 in segments:
        pad = max(r0, r1) + 2 * soft
        box = grid.box_clipped(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
        if box is None:
            continue
        px, py, pz = grid.sub(box)
        o = _segment_occupancy(px, py, pz, p0, p1, r0, r1, soft)
        np.maximum(occ[box], o, out=occ[box])
    occ *= lungs
    return occ


# --------------------------------------------------------------------------- nodules

_ELONGATION = {5: 1.0, 4: 1.15, 3: 1.35, 2: 1.6, 1: 1.9}
_EDGE_MM = {5: 0.0, 4: 0.8, 3: 1.6, 2: 2.5, 1: 3.5}
_CORE_FRACTION = {1: 0.0, 2: 0.35, 3: 0.55, 4: 0.75, 5: 1.0}
_GGO_HU = {1: -620.0, 2: -580.0, 3: -540.0, 4: -480.0, 5: -400.0}
_CONTRAST = {1: 0.4, 2: 0.55, 3: 0.7, 4: 0.85, 5: 1.0}
_SOLID_HU = 30.0


def _sample_attributes(rng: np.random.Generator) -> dict[str, int | float]:
    """Attributes from one of two overlapping profiles (suspicious / benign-looking)."""

    def pick(p):
        return int(rng.choice(np.arange(1, len(p) + 1), p=np.asarray(p) / np.sum(p)))

    if rng.random() < 0.5:  # suspicious profile
        d = 8.0 + 21.0 * rng.beta(1.4, 1.4)
        a = {
            "spiculation": pick([0.15, 0.2, 0.25, 0.2, 0.2]),
            "lobulation": pick([0.15, 0.2, 0.25, 0.2, 0.2]),
            "margin": pick([0.2, 0.3, 0.25, 0.15, 0.1]),
            "texture": pick([0.05, 0.15, 0.25, 0.2, 0.35]),
            "sphericity": pick([0.1, 0.25, 0.3, 0.25, 0.1]),
            "calcification": 6 if rng.random() < 0.95 else int(rng.choice([4, 5])),
        }
    else:  # benign-looking profile
        d = 4.5 + 14.0 * rng.beta(1.2, 2.5)
        a = {
            "spiculation": pick([0.6, 0.25, 0.1, 0.05, 0]),
            "lobulation": pick([0.5, 0.3, 0.15, 0.05, 0]),
            "margin": pick([0.05, 0.1, 0.2, 0.3, 0.35]),
            "texture": pick([0.1, 0.05, 0.05, 0.15, 0.65]),
            "sphericity": pick([0, 0.05, 0.2, 0.35, 0.4]),
            "calcification": 6 if rng.random() < 0.55 else pick([0.15, 0.15, 0.35, 0.1, 0.25]),
        }
    if a["calcification"] != 6:  # calcified nodules are solid and well defined
        a["texture"] = 5
        a["margin"] = max(a["margin"], 3)
    sub = 1.0 + (d - 4.0) / 5.0 + 0.25 * (a["texture"] - 1) + 0.5 * (a["calcification"] != 6)
    a["subtlety"] = int(np.clip(round(sub + rng.normal(0, 0.5)), 1, 5))
    a["diameter_mm"] = float(d)
    return a


class _Shape:
    """Radial function r(u) (unit-free, mean volume 1) of a nodule from lobulation and spiculation."""

    def __init__(self, attrs: Mapping[str, Any], rng: np.random.Generator):
        lob, spic = int(attrs["lobulation"]), int(attrs["spiculation"])
        self.bump_dirs = _random_unit(rng, int(rng.integers(5, 9)))
        self.bump_amp = 0.09 * (lob - 1) * rng.uniform(0.6, 1.0, len(self.bump_dirs))
        n_spikes = 5 * (spic - 1)
        self.spike_dirs = _random_unit(rng, n_spikes)
        self.spike_amp = 0.28 * (spic - 1) * rng.uniform(0.6, 1.0, n_spikes)
        self.spike_cos = math.cos(math.radians(12.0))
        self.norm = 1.0
        dirs = _fibonacci_sphere(4000)
        self.norm = float(np.mean(self.raw(dirs) ** 3)) ** (1.0 / 3.0)
        self.max_factor = float(self.raw(dirs).max() / self.norm) * 1.05

    def raw(self, u: np.ndarray) -> np.ndarray:
        r = np.ones(u.shape[0], dtype=np.float32)
        if len(self.bump_dirs):
            r += (np.exp((u @ self.bump_dirs.T - 1.0) / 0.12) @ self.bump_amp).astype(np.float32)
        if len(self.spike_dirs):
            c = np.clip((u @ self.spike_dirs.T - self.spike_cos) / (1.0 - self.spike_cos), 0.0, 1.0)
            r += ((c**1.5) @ self.spike_amp).astype(np.float32)
        return r / np.float32(self.norm)


def _draw_nodule(px, py, pz, center, radius, rot, elong, shape: _Shape, attrs, rng, soft_vox):
    """(occupancy, inside mask, value HU) of a nodule on the points (px, py, pz) (same shapes)."""
    v = np.stack([px - np.float32(center[0]), py - np.float32(center[1]), pz - np.float32(center[2])], -1)
    v = v.reshape(-1, 3) @ rot.astype(np.float32)  # nodule frame
    e = np.array([elong ** (2 / 3), elong ** (-1 / 3), elong ** (-1 / 3)], dtype=np.float32)
    w = v / e
    n = np.linalg.norm(w, axis=1)
    uvec = w / np.maximum(n, 1e-6)[:, None]
    rr = shape.raw(uvec) * np.float32(radius)
    rho = n / rr  # normalised radius: 1 on the surface
    sd = (n - rr) * np.float32(np.cbrt(e.prod()))  # approx. signed distance (mm)
    edge = _EDGE_MM[int(attrs["margin"])] + soft_vox
    occ = np.clip(0.5 - sd / np.float32(edge), 0.0, 1.0)
    inside = sd <= 0.0

    tex, calc = int(attrs["texture"]), int(attrs["calcification"])
    core = _CORE_FRACTION[tex]
    val = np.where(rho <= core, np.float32(_SOLID_HU), np.float32(_GGO_HU[tex])).astype(np.float32)
    if calc != 6:
        cal = np.zeros_like(val, dtype=bool)
        if calc == 3:
            cal = rho <= 0.85
        elif calc == 5:
            cal = rho <= 0.45
        elif calc == 2:
            cal = (rho <= 0.2) | ((rho >= 0.35) & (rho <= 0.5)) | ((rho >= 0.68) & (rho <= 0.8))
        elif calc == 4:
            off = _random_unit(rng, 1)[0] * 0.45
            cal = np.linalg.norm(w / np.float32(radius) - off, axis=1) <= 0.33
        elif calc == 1:
            for off in _random_unit(rng, 5) * rng.uniform(0.2, 0.6, (5, 1)):
                cal |= np.linalg.norm(w / np.float32(radius) - off, axis=1) <= 0.2
        val = np.where(cal, np.float32({1: 900, 2: 650, 3: 700, 4: 750, 5: 800}[calc]), val)
    shp = px.shape
    return occ.reshape(shp), inside.reshape(shp), val.reshape(shp)


def _place_nodules(grid, hu, lungs, n_nodules, rng, info) -> tuple[np.ndarray, list[dict]]:
    mask = np.zeros(grid.shape, dtype=np.int16)
    nodules: list[dict] = []
    voxel_mm3 = float(np.prod(grid.spacing))
    soft_vox = float(min(grid.spacing.min(), 1.0))
    lung_idx = np.argwhere(lungs[::4, ::4, ::2]) * np.array([4, 4, 2])
    if len(lung_idx) == 0:
        return mask, nodules
    for _ in range(n_nodules):
        attrs = _sample_attributes(rng)
        shape = _Shape(attrs, rng)
        rot = _random_rotation(rng)
        elong = _ELONGATION[int(attrs["sphericity"])]
        target_d = float(attrs["diameter_mm"])
        placed = False
        for attempt in range(80):
            if attempt and attempt % 16 == 0:
                target_d = max(4.5, target_d * 0.8)  # does not fit: smaller
            radius = target_d / 2.0
            reach = radius * shape.max_factor * elong ** (2 / 3) + _EDGE_MM[int(attrs["margin"])] + 2.0
            ijk = lung_idx[rng.integers(len(lung_idx))] + rng.uniform(-1.5, 1.5, 3)
            center = (grid.direction @ (ijk * grid.spacing)) + grid.origin - grid.center
            box = grid.box(center, reach)
            if box is None:
                continue
            px, py, pz = grid.sub(box)
            ball = (px - center[0]) ** 2 + (py - center[1]) ** 2 + (pz - center[2]) ** 2 <= reach**2
            if not lungs[box][ball].all() or mask[box][ball].any():
                continue
            occ, inside, val = _draw_nodule(px, py, pz, center, radius, rot, elong, shape, attrs, rng, soft_vox)
            if not inside.any():
                continue
            placed = True
            break
        if not placed:
            continue
        nid = len(nodules) + 1
        bg = hu[box]
        contrast = np.float32(_CONTRAST[int(attrs["subtlety"])])
        nod_val = bg + contrast * (val - bg)
        hu[box] = bg + occ * (nod_val - bg)
        m = mask[box]
        m[inside] = nid
        # measured attributes: the drawn size and position
        count = int(inside.sum())
        d_meas = (6.0 * count * voxel_mm3 / math.pi) ** (1.0 / 3.0)
        cen_rel = np.array([px[inside].mean(), py[inside].mean(), pz[inside].mean()], dtype=np.float64)
        attrs["diameter_mm"] = round(d_meas, 2)
        nodule = {
            "id": nid,
            "center_mm": [round(float(c), 3) for c in cen_rel + grid.center],
            "diameter_mm": attrs["diameter_mm"],
            "malignancy": malignancy_rule(attrs),
            **{k: int(attrs[k]) for k in NODULE_KEYS[4:]},
        }
        nodules.append(nodule)
    return mask, nodules


def _filtered_noise_std(sigma: float, truncate: float, ndim: int) -> float:
    """Std of unit white noise after ``ndimage.gaussian_filter`` along ``ndim`` axes."""
    radius = int(truncate * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w /= w.sum()
    return float(np.sum(w**2)) ** (ndim / 2.0)


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

    Returns:
        A ``Phantom`` (CT, nodule instance mask, lung mask, nodule attribute dicts).
    """
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

    ss = np.random.SeedSequence(int(seed))
    rng_anat, rng_nod, rng_noise, rng_label = (np.random.default_rng(c) for c in ss.spawn(4))
    grid = _Grid(size, spacing_arr, d, o)
    hu, lungs, info = _anatomy(grid, rng_anat)
    # partial volume: blur the hard-edged anatomy in plane (and a little along z)
    sig = np.clip(0.5 / spacing_arr * spacing_arr.min(), 0.25, 0.6)
    hu = ndimage.gaussian_filter(hu, sigma=sig, mode="nearest", truncate=3.0)
    vessels = _vessels(grid, lungs, info, rng_anat)
    hu += vessels * (np.float32(BLOOD) - hu)

    if n_nodules is None:
        n_nodules = int(rng_nod.integers(0, 4))
    mask, nodules = _place_nodules(grid, hu, lungs, int(n_nodules), rng_nod, info)
    if label_noise > 0:
        for nod in nodules:
            if rng_label.random() < label_noise:
                nod["malignancy"] = 1 - nod["malignancy"]

    # CT noise: white noise, slightly correlated in plane
    noise = rng_noise.standard_normal(size, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.6, 0.6, 0.0), mode="wrap", truncate=2.5)
    noise *= np.float32(noise_hu / _filtered_noise_std(0.6, 2.5, 2))
    hu += noise
    np.rint(hu, out=hu)
    np.clip(hu, -1024.0, 3071.0, out=hu)

    meta = {"format": "phantom", "modality": "CT", "seed": int(seed), "generator_version": GENERATOR_VERSION}
    ct = Volume(hu.astype(np.float32, copy=False), o, spacing_arr, d, dict(meta))
    return Phantom(
        ct=ct,
        nodule_mask=ct.with_array(mask, kind="nodule_mask"),
        lung_mask=ct.with_array(lungs.astype(np.uint8), kind="lung_mask"),
        nodules=nodules,
        seed=int(seed),
        label_noise=float(label_noise),
        info={"size": list(size), "spacing": spacing_arr.tolist()},
    )


def _atomic_json(obj: Any, path: Path) -> None:
    from .io.writer import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _labels_json(phantom: Phantom) -> dict[str, Any]:
    ct = phantom.ct
    return {
        "nodules": phantom.nodules,
        "seed": phantom.seed,
        "size": list(ct.shape),
        "spacing": [float(v) for v in ct.spacing],
        "origin": [float(v) for v in ct.origin],
        "direction": [[float(v) for v in row] for row in ct.direction],
        "label_noise": phantom.label_noise,
        "generator_version": phantom.generator_version,
        "malignancy_rule": "medvit_explain.phantom.malignancy_rule",
    }


def write_phantom(phantom: Phantom, out_dir: str | os.PathLike, name: str, format: str = "nifti") -> dict[str, Path]:
    """Write a phantom as files; returns ``{"ct", "nodule_mask", "lung_mask", "json"[, "dicom"]}`` paths.

    ``<name>.nii.gz`` (CT, int16 HU), ``<name>_nodules.nii.gz`` (int16 ids), ``<name>_lungs.nii.gz``
    (uint8), ``<name>.json`` (labels and generator arguments) and, for ``format="dicom"``, the CT as a
    series in ``<name>_dicom/`` (deterministic UIDs from the seed and name). Every file is written to a
    temporary name and renamed, so no partial file sits at a final path; the same phantom written twice
    gives byte-identical files.
    """
    from .io.dicom_series import write_ct_series
    from .io.writer import usual_mode, write_volume

    if format not in ("nifti", "dicom"):
        raise ValueError(f"expected format 'nifti' or 'dicom', got {format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "ct": write_volume(phantom.ct, out / f"{name}.nii.gz", dtype=np.int16),
        "nodule_mask": write_volume(phantom.nodule_mask, out / f"{name}_nodules.nii.gz", dtype=np.int16),
        "lung_mask": write_volume(phantom.lung_mask, out / f"{name}_lungs.nii.gz", dtype=np.uint8),
    }
    if format == "dicom":
        final = out / f"{name}_dicom"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}_dicom.", dir=out))
        os.chmod(tmp, usual_mode(directory=True))  # mkdtemp makes 0700; this folder becomes the series
        try:
            write_ct_series(
                phantom.ct,
                tmp,
                series_description=f"medvit-explain phantom {name}",
                uid_seed=f"phantom:{phantom.generator_version}:{phantom.seed}:{name}",
                patient_id=name,
                window=(-600.0, 1500.0),
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        paths["dicom"] = final
    json_path = out / f"{name}.json"
    _atomic_json(_labels_json(phantom), json_path)
    paths["json"] = json_path
    return paths


def phantom_seed(seed: int, index: int) -> int:
    """The seed of phantom ``index`` in a set made from ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def make_phantoms(
    out_dir: str | os.PathLike,
    seed: int,
    count: int = 1,
    format: str = "nifti",
    size: Sequence[int] = DEFAULT_SIZE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    name_prefix: str = "phantom",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Generate and write ``count`` phantoms ``<name_prefix>_000``, ``_001``, … into ``out_dir``.

    Phantom ``i`` uses ``phantom_seed(seed, i)``; extra keyword arguments go to ``generate_phantom``.
    Returns one dict per phantom: the paths of ``write_phantom`` plus ``name``, ``seed`` and ``nodules``.
    """
    results = []
    for i in range(int(count)):
        s = phantom_seed(seed, i)
        name = f"{name_prefix}_{i:03d}"
        ph = generate_phantom(s, size=size, spacing=spacing, **kwargs)
        paths = write_phantom(ph, out_dir, name, format=format)
        results.append({**paths, "name": name, "seed": s, "nodules": ph.nodules})
    return results


def make_phantom_groups(
    out_dir: str | os.PathLike, groups: Sequence[Mapping[str, Any]], seed: int, name_prefix: str = "grid"
) -> list[dict[str, Any]]:
    """Several :func:`make_phantoms` sets in one folder, one per grid: group ``g`` (``count``, ``size``,
    ``spacing``) uses seed ``seed + 100 g`` and names ``<name_prefix><g>_000``, … (the recipes in
    ``configs/sample_model.yaml``)."""
    written = []
    for g, group in enumerate(groups):
        written += make_phantoms(
            out_dir,
            seed=seed + 100 * g,
            count=int(group["count"]),
            size=tuple(group["size"]),
            spacing=tuple(group["spacing"]),
            name_prefix=f"{name_prefix}{g}",
        )
    return written


def _read_mask(mask: Any) -> np.ndarray:
    if isinstance(mask, Volume):
        return np.asarray(mask.array)
    if isinstance(mask, (str, os.PathLike)):
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(sitk.ReadImage(str(mask))).transpose(2, 1, 0)
    return np.asarray(mask)


def slice_labels(
    source: Phantom | Mapping[str, Any] | Sequence[Mapping[str, Any]] | str | os.PathLike,
    nodule_mask: Volume | np.ndarray | str | os.PathLike | None = None,
    *,
    min_area_mm2: float = 0.0,
    spacing: Sequence[float] | None = None,
) -> list[dict[str, Any] | None]:
    """Per axial slice ``k`` of the grid, the nodules present and the slice's training labels.

    Args:
        source: a ``Phantom``; or the labels JSON (its path, its loaded dict, or the nodule list),
            together with ``nodule_mask``.
        nodule_mask: instance-id mask ``[X, Y, Z]`` (``Volume``, array, or a NIfTI path).
        min_area_mm2: a nodule counts in a slice only if its cross-section is at least this large.
        spacing: voxel spacing when ``nodule_mask`` is a bare array (default: from the JSON or 1 mm).

    Returns:
        A list of length Z: ``None`` for a slice without nodules, else a dict with ``k``,
        ``nodule_ids`` (ascending), ``areas_mm2`` (same order), ``malignancy`` (max over the nodules
        present), ``largest_id`` and the biomarkers of the largest-area nodule in that slice
        (``subtlety, calcification, margin, lobulation, spiculation, texture, sphericity,
        diameter_mm``).
    """
    labels_json: Mapping[str, Any] = {}
    if isinstance(source, Phantom):
        nodules = source.nodules
        mask_vol: Any = source.nodule_mask if nodule_mask is None else nodule_mask
    else:
        if isinstance(source, (str, os.PathLike)):
            labels_json = json.loads(Path(source).read_text())
            nodules = labels_json["nodules"]
        elif isinstance(source, Mapping):
            labels_json = source
            nodules = source["nodules"]
        else:
            nodules = list(source)
        if nodule_mask is None:
            raise ValueError("expected a nodule_mask with JSON labels, got None")
        mask_vol = nodule_mask
    if spacing is not None:
        sp = np.asarray(spacing, dtype=np.float64)
    elif isinstance(mask_vol, Volume):
        sp = mask_vol.spacing
    elif isinstance(mask_vol, (str, os.PathLike)):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(mask_vol))
        reader.ReadImageInformation()
        sp = np.asarray(reader.GetSpacing(), dtype=np.float64)
    else:
        sp = np.asarray(labels_json.get("spacing", (1.0, 1.0, 1.0)), dtype=np.float64)
    mask = _read_mask(mask_vol)
    if mask.ndim != 3:
        raise ValueError(f"expected a 3D [X, Y, Z] nodule mask, got shape {mask.shape}")
    by_id = {int(n["id"]): n for n in nodules}
    pixel_mm2 = float(sp[0] * sp[1])
    n_ids = int(mask.max()) + 1 if mask.size else 1
    out: list[dict[str, Any] | None] = []
    for k in range(mask.shape[2]):
        counts = np.bincount(mask[:, :, k].ravel().astype(np.int64), minlength=n_ids)
        present = [
            (i, counts[i] * pixel_mm2)
            for i in range(1, len(counts))
            if counts[i] > 0 and counts[i] * pixel_mm2 >= min_area_mm2 and i in by_id
        ]
        if not present:
            out.append(None)
            continue
        largest = max(present, key=lambda t: (t[1], -t[0]))[0]
        rec: dict[str, Any] = {
            "k": k,
            "nodule_ids": [i for i, _ in present],
            "areas_mm2": [round(float(a), 3) for _, a in present],
            "malignancy": max(int(by_id[i]["malignancy"]) for i, _ in present),
            "largest_id": largest,
        }
        rec.update({key: by_id[largest][key] for key in BIOMARKER_KEYS})
        out.append(rec)
    return out
