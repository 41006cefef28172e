"""Lung nodules of the phantoms: attributes (biomarkers), the malignancy rule, shapes, drawing, placing.

Each nodule is drawn from LIDC-IDRI attributes (``diameter_mm`` 4-30, ``subtlety`` 1-5,
``calcification`` 1-6 with 6 = absent, ``margin`` 1-5 with 5 = sharp, ``lobulation`` 1-5,
``spiculation`` 1-5, ``texture`` 1-5 with 5 = solid, ``sphericity`` 1-5 with 5 = round) and each
attribute changes the image, strongly enough to be seen in a 32-48 mm crop:

* diameter: size. The reported ``diameter_mm`` is measured on the drawn mask (volume-equivalent
  sphere diameter), so it is the real drawn size.
* sphericity: elongation (long / short axis 1.0 … 1.9, volume preserved), random orientation.
  Generator 2.1 (``GRADES``): 1.0 / 1.3 / 1.7 / 2.2 / 2.8 for grades 5 … 1 (LIDC round … linear), the
  sampled size cut so the long axis stays under 40 mm.
* lobulation: 4-7 dome-shaped lobes on the surface (height 0.1 … 0.5 of the radius, 28-40° wide) with
  notches where they meet, so the outline is visibly bumpy. Generator 2.1: each grade above 1 adds 0.12 of
  the radius or half an in-plane voxel, whichever is more, up to 0.75 of the radius; generator 2.2: or
  1 mm, whichever is more (the 1 mm ROI sampling: a half-voxel step is 0.35 mm on a 0.7 mm grid).
* spiculation: thin, bright, tapered spikes radiating from the surface (3 / 5 / 8 / 11 of them for
  scores 2-5, about 3-18 mm long, longer with the score and the size); drawn at least about one voxel
  wide and not blurred by the margin, as a strand would look after partial volume.
* margin: width of the blurred edge (5 = sharp, 1 = about 3.5 mm of blur; generator 2.1: 1.0 / 2.0 / 3.0 /
  4.2 mm for grades 4 … 1).
* texture: density: 1 pure ground glass (about -620 HU), 2-4 part-solid (a solid core of 0.35 / 0.55 /
  0.75 of the radius inside ground glass), 5 solid (about +30 HU).
* calcification: 1 popcorn blobs, 2 laminated (nidus and two rings), 3 solid (almost all), 4 one
  non-central deposit, 5 one central deposit (650-900 HU); 6 none. Deposits are at least about one
  voxel across, so small nodules keep their pattern.
* subtlety: contrast against the lung (1 = 40 %, 5 = 100 %).

Feature labels (``FEATURE_LABELS``, the ``features`` map of a phantom) say which part of a nodule each
voxel of its instance mask belongs to: 1 solid core (the rest of the solid body), 2 spicules (spike
voxels outside the body), 3 lobulation (lobe voxels beyond the base ellipsoid), 4 calcification,
5 ground glass (texture 1-4: the body outside the solid core). Where parts overlap the precedence is
calcification > spicules > lobulation > ground glass > core. A voxel is labelled exactly when it is in
the nodule's instance mask (occupancy ≥ 0.5); the partial-volume rim outside the mask is 0 in both.

Malignancy (0/1) follows :func:`malignancy_rule`; ``label_noise`` flips it with a small probability.
Attributes are drawn from two overlapping profiles (suspicious / benign-looking), so about half of the
nodules come out malignant and malignant nodules are, on average, large, spiculated and lobulated,
while benign ones are small, smooth, round and often calcified.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .anatomy import _fibonacci_sphere, _random_rotation, _random_unit, _segment_occupancy

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
    "feature_voxels",
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
FEATURE_LABELS = {1: "core", 2: "spicules", 3: "lobulation", 4: "calcification", 5: "ground_glass"}  # 0: none


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


@dataclass(frozen=True)
class NoduleGrades:
    """How strongly a generator version draws the shape grades (``GRADES``).

    ``elongation``: long / short axis per sphericity grade; ``edge_mm``: blur of the edge per margin grade;
    ``lobe_step_vox``: a lobulation step is at least this many in-plane voxels high (0: ``_LOBE_AMP`` of the
    radius only); ``lobe_step_mm``: and at least this many mm, whatever the grid; ``long_axis_max_mm``: an
    elongated nodule's sampled size is cut so its long axis stays under this (inf: no cut;
    ``nodule_attributes`` overrides are drawn as asked).
    """

    elongation: Mapping[int, float]
    edge_mm: Mapping[int, float]
    lobe_step_vox: float
    long_axis_max_mm: float
    lobe_step_mm: float = 0.0

    def lobe_floor_mm(self, inplane_mm: float) -> float:
        """The least height (mm) of a lobulation step on a grid of ``inplane_mm`` in-plane voxels."""
        return max(self.lobe_step_vox * inplane_mm, self.lobe_step_mm)


GRADES = {
    # phantoms v2: a sphericity or lobulation grade can be a sub-voxel change on a small nodule
    "2.0": NoduleGrades(
        elongation={5: 1.0, 4: 1.15, 3: 1.35, 2: 1.6, 1: 1.9},
        edge_mm={5: 0.0, 4: 0.8, 3: 1.6, 2: 2.5, 1: 3.5},
        lobe_step_vox=0.0,
        long_axis_max_mm=math.inf,
    ),
    # the grades made visible at the grid: LIDC's round / ovoid / linear (1.3x the axis ratio a step),
    # lobulation steps of at least half an in-plane voxel, wider margin blur
    "2.1": NoduleGrades(
        elongation={5: 1.0, 4: 1.3, 3: 1.7, 2: 2.2, 1: 2.8},
        edge_mm={5: 0.0, 4: 1.0, 3: 2.0, 2: 3.0, 1: 4.2},
        lobe_step_vox=0.5,
        long_axis_max_mm=40.0,
    ),
}
# 2.1 with a lobulation step of at least 1 mm on any grid: on LIDC-like grids (0.7 mm in plane) 2.1's half voxel
# is back to 2.0's 0.12 of the radius, under the ROI's 1 mm sampling (README "sample-roi")
GRADES["2.2"] = replace(GRADES["2.1"], lobe_step_mm=1.0)

_CORE_FRACTION = {1: 0.0, 2: 0.35, 3: 0.55, 4: 0.75, 5: 1.0}
_GGO_HU = {1: -620.0, 2: -580.0, 3: -540.0, 4: -480.0, 5: -400.0}
_CONTRAST = {1: 0.4, 2: 0.55, 3: 0.7, 4: 0.85, 5: 1.0}
_SOLID_HU = 30.0
_CALC_HU = {1: 900.0, 2: 650.0, 3: 700.0, 4: 750.0, 5: 800.0}
_LOBE_AMP = 0.12  # lobe height per lobulation step above 1, fraction of the base radius (or a voxel floor)
_LOBE_AMP_MAX = 0.75  # the highest lobe, fraction of the base radius (2.1's floor saturates on small nodules)
_SPIKES = {1: 0, 2: 3, 3: 5, 4: 8, 5: 11}  # spicules per spiculation score (± 1)


def _sample_attributes(rng: np.random.Generator, grades: NoduleGrades = GRADES["2.0"]) -> dict[str, int | float]:
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
    d = min(d, grades.long_axis_max_mm / grades.elongation[a["sphericity"]] ** (2 / 3))  # d: volume-equivalent
    sub = 1.0 + (d - 4.0) / 5.0 + 0.25 * (a["texture"] - 1) + 0.5 * (a["calcification"] != 6)
    a["subtlety"] = int(np.clip(round(sub + rng.normal(0, 0.5)), 1, 5))
    a["diameter_mm"] = float(d)
    return a


def _spread_units(rng: np.random.Generator, n: int, min_deg: float) -> np.ndarray:
    """Up to ``n`` random unit vectors ``[m, 3]`` at least ``min_deg`` apart (greedy over candidates)."""
    chosen: list[np.ndarray] = []
    if n <= 0:
        return np.zeros((0, 3))
    cos_max = math.cos(math.radians(min_deg))
    for v in _random_unit(rng, 12 * n):
        if all(float(v @ c) < cos_max for c in chosen):
            chosen.append(v)
            if len(chosen) == n:
                break
    return np.array(chosen)


class _Shape:
    """A nodule's random make-up, drawn once: lobes, spicules and calcified deposits.

    * Lobes: spherical-cap domes on the base ellipsoid, ``r(u) = (1 + max_i a_i dome_i(u)) / norm``
      (unit-free radius, mean volume 1), with a notch where a dome meets the base surface.
    * Spicules: directions in the patient frame (spread, flattened towards the axial plane) and relative
      lengths; their size in mm is set by :func:`_spicules` from the nodule radius and the grid.
    * Calcified deposits (``_Shape.deposits``): centres (in units of the base radius, nodule frame) and
      radii of the popcorn / non-central deposits.
    """

    def __init__(self, attrs: Mapping[str, Any], rng: np.random.Generator, floor_mm: float = 0.0):
        """``floor_mm``: the least height (mm) of a lobulation step (``NoduleGrades.lobe_floor_mm``)."""
        lob, spic, calc = int(attrs["lobulation"]), int(attrs["spiculation"]), int(attrs["calcification"])
        n_lobes = int(rng.integers(4, 8)) if lob > 1 else 0
        self.lobe_dirs = _spread_units(rng, n_lobes, 50.0)
        step = max(_LOBE_AMP, floor_mm / (0.5 * float(attrs["diameter_mm"])))  # per grade, of the radius
        amp = min(step * (lob - 1), _LOBE_AMP_MAX) * rng.uniform(0.75, 1.0, len(self.lobe_dirs))
        self.lobe_amp = amp.astype(np.float32)
        self.lobe_cos = np.cos(np.radians(rng.uniform(28.0, 40.0, len(self.lobe_dirs)))).astype(np.float32)
        n_spikes = _SPIKES[spic] + (int(rng.integers(-1, 2)) if spic > 1 else 0)
        # spicule directions in the patient frame, flattened towards the axial plane: a spike along z
        # crosses each slice as a dot, one in plane shows its whole length there
        flat = _spread_units(rng, n_spikes, 25.0) * np.array([1.0, 1.0, 0.4])
        self.spike_dirs = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-9)
        self.spike_len = rng.uniform(0.7, 1.0, len(self.spike_dirs))
        self.deposits = np.zeros((0, 3))  # popcorn (1) / non-central (4) deposit centres, base radii
        if calc == 1:
            k = int(rng.integers(3, 6))
            self.deposits = _random_unit(rng, k) * rng.uniform(0.1, 0.55, (k, 1))
        elif calc == 4:
            self.deposits = _random_unit(rng, 1) * 0.5
        self.norm = 1.0
        dirs = _fibonacci_sphere(4000).astype(np.float32)
        raw = self.raw(dirs)
        self.norm = float(np.mean(raw.astype(np.float64) ** 3)) ** (1.0 / 3.0)
        self.max_factor = float(raw.max() / self.norm) * 1.05

    def lobes(self, u: np.ndarray) -> np.ndarray:
        """Height of the lobes ``[N]`` (unit-free, 0 off the lobes) in the unit directions ``u`` ``[N, 3]``."""
        if not len(self.lobe_dirs):
            return np.zeros(u.shape[0], dtype=np.float32)
        c = u @ self.lobe_dirs.T.astype(np.float32)
        dome = np.sqrt(np.clip((c - self.lobe_cos) / (1.0 - self.lobe_cos), 0.0, 1.0))
        return (dome * self.lobe_amp).max(axis=1)

    def raw(self, u: np.ndarray) -> np.ndarray:
        return (1.0 + self.lobes(u)) / np.float32(self.norm)


def _spicules(px, py, pz, center, r_base, rot, e, shape: _Shape, spic: int, soft: float, h: float):
    """Soft occupancy (float32, ``px.shape``) of the spicules: thin tapered tubes from inside the surface
    outwards along ``shape.spike_dirs`` (patient frame), up to ``_spike_length`` mm beyond the surface; at
    least about one in-plane voxel ``h`` wide so they survive sampling (a thin strand's partial volume)."""
    occ = np.zeros(px.shape, dtype=np.float32)
    if not len(shape.spike_dirs):
        return occ
    length = _spike_length(spic, r_base)
    r0 = max(0.08 * r_base + 0.4, 0.55 * h)
    r1 = max(0.3 * r0, 0.35 * h)
    u = (shape.spike_dirs @ rot) / e  # the spike directions in the sphere frame of the nodule
    u = (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)
    surf = (u * e) * ((1.0 + shape.lobes(u)) * np.float32(r_base))[:, None]  # surface points, nodule frame
    for out, s, f in zip(shape.spike_dirs, surf, shape.spike_len, strict=True):
        p_surf = center + rot @ s
        p0 = center + rot @ (s * 0.75)
        p1 = p_surf + out * (length * f)
        np.maximum(occ, _segment_occupancy(px, py, pz, p0, p1, r0, r1, soft), out=occ)
    return occ


def _spike_length(spic: int, r_base: float) -> float:
    """Longest spicule (mm) beyond the surface: longer with the spiculation score and the nodule."""
    return float(np.clip((0.35 + 0.25 * (spic - 1)) * r_base + 1.0 * (spic - 1), 3.0, 18.0))


def _reach(
    shape: _Shape, attrs: Mapping[str, Any], radius: float, elong: float, edge_mm: float, h: float
) -> tuple[float, float]:
    """Radii (mm) of balls around the centre that hold the nodule's body (blurred edge included) and
    everything it draws (spicules included)."""
    body = radius * shape.max_factor * elong ** (2 / 3) + edge_mm + 2.0
    if not len(shape.spike_dirs):
        return body, body
    r_base = radius / shape.norm
    tip = radius * shape.max_factor * elong ** (2 / 3) + _spike_length(int(attrs["spiculation"]), r_base)
    return body, max(body, tip + max(0.08 * r_base + 0.4, 0.55 * h) + 2.0)


def _calcified(w, rho, r_base: float, calc: int, shape: _Shape, h: float) -> np.ndarray:
    """Signed size (< 0 inside a deposit, float32 ``[N]``) of the calcified deposits of pattern ``calc``.

    Sizes are fractions of the base radius ``r_base`` with a floor of about one in-plane voxel ``h``, so
    small nodules still show their pattern: 1 popcorn blobs, 2 laminated (nidus and two rings), 3 solid
    (almost the whole nodule), 4 one eccentric deposit, 5 one central deposit."""
    q = np.linalg.norm(w, axis=1) / np.float32(r_base)  # normalised radius of the base ellipsoid
    hr = h / r_base
    if calc == 3:
        return rho - np.float32(0.85)
    if calc == 5:
        return q - np.float32(min(max(0.45, 0.9 * hr), 0.8))
    if calc == 2:
        half = max(0.07, 0.4 * hr)
        rings = np.minimum(np.abs(q - np.float32(0.5)), np.abs(q - np.float32(0.8))) - np.float32(half)
        return np.minimum(q - np.float32(max(0.2, 0.6 * hr)), rings)
    rad = min(max(0.3 if calc == 1 else 0.4, (1.0 if calc == 1 else 1.2) * hr), 0.6)
    out = np.full(q.shape, np.inf, dtype=np.float32)
    for c in shape.deposits:
        off = c * min(1.0, (0.9 - rad) / max(float(np.linalg.norm(c)), 1e-6))  # keep the deposit inside
        np.minimum(out, np.linalg.norm(w / np.float32(r_base) - off.astype(np.float32), axis=1) - rad, out=out)
    return out


def _draw_nodule(
    px, py, pz, center, radius, rot, elong, edge_mm: float, shape: _Shape, attrs, soft_vox: float, h: float, lungs
):
    """One nodule on the points ``(px, py, pz)`` (same shapes): ``(occupancy, inside, value HU, labels)``.

    ``occupancy`` in [0, 1] blends the nodule into the background, ``inside`` (occupancy ≥ 0.5) is its
    instance mask, ``labels`` its feature labels (uint8, 0 outside ``inside``; see ``FEATURE_LABELS``).
    Spicules are drawn only on the points where ``lungs`` (bool, same shape) holds.
    """
    v = np.stack([px - np.float32(center[0]), py - np.float32(center[1]), pz - np.float32(center[2])], -1)
    v = v.reshape(-1, 3) @ rot.astype(np.float32)  # nodule frame
    e = np.array([elong ** (2 / 3), elong ** (-1 / 3), elong ** (-1 / 3)], dtype=np.float32)
    w = v / e  # the ellipsoid's frame: a sphere there (e.prod() == 1, so distances stay about mm)
    n = np.linalg.norm(w, axis=1)
    uvec = w / np.maximum(n, 1e-6)[:, None]
    r_base = float(radius) / shape.norm
    lob = shape.lobes(uvec)
    rr = np.float32(r_base) * (1.0 + lob)
    rho = n / rr  # normalised radius: 1 on the (lobulated) surface
    sd = n - rr  # approx. signed distance (mm)
    edge = edge_mm + soft_vox
    body_occ = np.clip(0.5 - sd / np.float32(edge), 0.0, 1.0)
    body = sd <= 0.0

    tex, calc, spic = int(attrs["texture"]), int(attrs["calcification"]), int(attrs["spiculation"])
    solid = rho <= _CORE_FRACTION[tex]
    val = np.where(solid, np.float32(_SOLID_HU), np.float32(_GGO_HU[tex])).astype(np.float32)
    spike_occ = (_spicules(px, py, pz, center, r_base, rot, e, shape, spic, soft_vox, h) * lungs).reshape(-1)
    occ = np.maximum(body_occ, spike_occ)
    val = np.where(spike_occ > body_occ, np.float32(_SOLID_HU), val)
    spike = (spike_occ >= 0.5) & ~body
    inside = body | spike

    labels = np.zeros(n.shape, dtype=np.uint8)  # painted in reverse precedence: later wins
    labels[body] = 1
    labels[body & ~solid] = 5
    labels[body & (lob > 0) & (n > np.float32(r_base))] = 3
    labels[spike] = 2
    if calc != 6:
        dep = _calcified(w, rho, r_base, calc, shape, h)
        cal = body & (dep <= 0.0)
        if not cal.any() and body.any():  # a deposit smaller than the grid: its closest voxel
            cal = body & (dep == dep[body].min())
        val = np.where(cal, np.float32(_CALC_HU[calc]), val)
        labels[cal] = 4
    shp = px.shape
    return occ.reshape(shp), inside.reshape(shp), val.reshape(shp), labels.reshape(shp)


def _place_nodules(
    grid, hu, lungs, n_nodules, rng, overrides: Sequence[Mapping[str, Any]], grades: NoduleGrades
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """Place and draw up to ``n_nodules`` nodules fully inside ``lungs`` into ``hu`` (in place), their shape
    grades drawn as ``grades`` says.

    Nodule ``i`` takes its sampled attributes updated with ``overrides[i]`` (when given). Returns the
    instance mask (int16), the feature labels (uint8), the nodules' soft occupancy (float32, for keeping
    vessels out of them) and the nodule dicts (``NODULE_KEYS``).
    """
    mask = np.zeros(grid.shape, dtype=np.int16)
    features = np.zeros(grid.shape, dtype=np.uint8)
    occupancy = np.zeros(grid.shape, dtype=np.float32)
    nodules: list[dict] = []
    voxel_mm3 = float(np.prod(grid.spacing))
    soft_vox = float(min(grid.spacing.min(), 1.0))
    h = float(grid.spacing[:2].min())
    lung_idx = np.argwhere(lungs[::4, ::4, ::2]) * np.array([4, 4, 2])
    if len(lung_idx) == 0:
        return mask, features, occupancy, nodules
    for i in range(n_nodules):
        attrs = _sample_attributes(rng, grades)
        if i < len(overrides):
            attrs.update(overrides[i])
        shape = _Shape(attrs, rng, floor_mm=grades.lobe_floor_mm(h))
        rot = _random_rotation(rng)
        elong = grades.elongation[int(attrs["sphericity"])]
        edge_mm = grades.edge_mm[int(attrs["margin"])]
        target_d = float(attrs["diameter_mm"])
        placed = False
        for attempt in range(80):
            if attempt and attempt % 16 == 0:
                target_d = max(4.5, target_d * 0.8)  # does not fit: smaller
            radius = target_d / 2.0
            body_reach, reach = _reach(shape, attrs, radius, elong, edge_mm, h)
            ijk = lung_idx[rng.integers(len(lung_idx))] + rng.uniform(-1.5, 1.5, 3)
            center = (grid.direction @ (ijk * grid.spacing)) + grid.origin - grid.center
            if grid.box(center, body_reach) is None:
                continue
            box = grid.box_clipped(center - reach, center + reach)
            px, py, pz = grid.sub(box)
            d2 = (px - center[0]) ** 2 + (py - center[1]) ** 2 + (pz - center[2]) ** 2
            # the body lies in the lungs; spicules may reach the pleura (they stop there), not another nodule
            if not lungs[box][d2 <= body_reach**2].all() or mask[box][d2 <= reach**2].any():
                continue
            in_lungs = lungs[box]
            occ, inside, val, labels = _draw_nodule(
                px, py, pz, center, radius, rot, elong, edge_mm, shape, attrs, soft_vox, h, in_lungs
            )
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
        mask[box][inside] = nid
        features[box][inside] = labels[inside]
        np.maximum(occupancy[box], occ, out=occupancy[box])
        # measured attributes: the drawn size and position
        count = int(inside.sum())
        d_meas = (6.0 * count * voxel_mm3 / math.pi) ** (1.0 / 3.0)
        cen_rel = np.array([px[inside].mean(), py[inside].mean(), pz[inside].mean()], dtype=np.float64)
        attrs["diameter_mm"] = round(d_meas, 2)
        per_label = np.bincount(labels[inside], minlength=len(FEATURE_LABELS) + 1)
        nodule = {
            "id": nid,
            "center_mm": [round(float(c), 3) for c in cen_rel + grid.center],
            "diameter_mm": attrs["diameter_mm"],
            "malignancy": malignancy_rule(attrs),
            **{k: int(attrs[k]) for k in NODULE_KEYS[4:-1]},
            "feature_voxels": {name: int(per_label[k]) for k, name in FEATURE_LABELS.items()},
        }
        nodules.append(nodule)
    return mask, features, occupancy, nodules
