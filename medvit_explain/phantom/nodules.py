"""Lung nodules of the phantoms: attributes (biomarkers), the malignancy rule, shapes, drawing, placing.

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

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .anatomy import _fibonacci_sphere, _random_rotation, _random_unit

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
