"""Chest anatomy of the phantoms: the voxel grid, body, lungs, vessels and CT noise.

A phantom is a chest-like CT in HU on an exact grid (any spacing, direction and origin) with:
air outside the body (-1000), a body outline that changes slowly along z, subcutaneous fat, chest-wall
muscle, two lungs (about -850, denser posteriorly), a heart, a descending aorta, mediastinal fat, the
airways (trachea, main and lobar bronchi: air in a soft-tissue wall, outside the lung mask), vertebrae
(cortical shell, discs, posterior arch), ribs with costal cartilage, a sternum, CT-like noise, and 0-3
nodules fully inside the lungs (see :mod:`.nodules`). Inside the lungs:

* fissures: thin (about 2 mm), slightly denser curved sheets, an oblique one in each lung and a
  horizontal one in the right lung, in front of the oblique one;
* vessels: branching trees from each hilum and, running cranio-caudally through each lung, 7-10 long
  vessels 3-8 mm across, so every axial slice shows round bright vessel sections of nodule size that
  are not nodules (a model has to look at a nodule's features, not at "a bright dot");
* partial volume: the hard-edged anatomy is blurred by about half a millimetre; vessels, fissures,
  nodules and spicules are drawn with soft (sub-voxel) edges.

Anatomy is laid out in **physical LPS millimetres** around the centre of the field of view (x to the
patient's left, y posterior, z superior), so an oblique or flipped grid shows the same patient, as a
scanner would. In-plane sizes scale down when the field of view is smaller than an adult chest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

AIR, LUNG, FAT, SOFT, MUSCLE, BLOOD = -1000.0, -850.0, -95.0, 40.0, 55.0, 42.0
BONE_CORTEX, BONE_MARROW, CARTILAGE = 700.0, 230.0, 130.0
_FISSURE_HU, _FISSURE_MM = -600.0, 1.1  # peak density and half thickness of a fissure


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

_Uniform = Callable[[float, float], float]


@dataclass
class _Torso:
    """Body outline shared by the anatomy helpers (mm relative to the FOV centre)."""

    s: float  # in-plane scale (1 for an adult chest)
    A0: float  # body semi-axes (x, y) at z = 0
    B0: float
    hz: float  # half z extent of the FOV, at least 40 mm
    yc: np.float32  # y of the body centre
    rho_body: np.ndarray  # normalised body radius (1 on the skin)
    body: np.ndarray
    rho_mus_in: float  # normalised radius of the inner border of the chest-wall muscle
    inner: np.ndarray  # inside the chest wall


def _anatomy(grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Hard-edged anatomy: (HU float32 [X,Y,Z], lung mask bool, layout parameters)."""
    y, z = grid.y, grid.z
    s = min(1.0, 0.9 * grid.half_inplane / 170.0)  # in-plane scale: adult chest in a >= 380 mm FOV
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    hu, t = _body_wall(grid, u, s)
    hz, B0, yc = t.hz, t.B0, t.yc

    # lungs: two ellipses per slice, shrinking towards the ends of the covered z range
    lz = hz * u(1.25, 1.5) + 20.0
    zc_l = np.float32(u(-0.15, 0.1) * hz)
    g = np.sqrt(np.clip(1.0 - ((z - zc_l) / np.float32(lz)) ** 2, 0.0, 1.0)).astype(np.float32)
    heart, heart_pad = _heart(grid, u, t)
    spine_c = np.array([0.0, 0.66 * B0])
    vert_r = 19.0 * s * u(0.9, 1.1)
    lungs, lung_params = _lung_masks(grid, u, t, g, heart_pad, spine_c, vert_r)
    _mediastinum(hu, grid, u, t, heart)
    carina_z = u(0.1, 0.45) * t.hz
    hilum_z = min(float(zc_l) + u(-10, 10), carina_z - 15.0)  # the main bronchi descend to the hila
    hila = [np.array([cx - np.sign(cx) * 0.55 * lx, float(yc) + cy + 5 * s, hilum_z]) for cx, cy, lx, _ in lung_params]
    wall, lumen, carina = _airways(grid, u, t, hila, carina_z)
    lungs = grid.full(lungs) & ~wall

    # lungs: parenchyma denser posteriorly (gravity); vessels and nodules come later
    lung_hu = (LUNG - 10.0 + 55.0 * np.clip((y - yc) / np.float32(B0), -1.0, 1.0)).astype(np.float32)
    hu = np.where(lungs, lung_hu, hu)
    hu[wall] = SOFT
    hu[lumen] = AIR
    _spine(hu, grid, u, t, spine_c, vert_r)
    _ribs(hu, grid, u, t)

    info = {
        "scale": s,
        "A0": t.A0,
        "B0": B0,
        "yc": float(yc),
        "lungs": lung_params,
        "lung_z": (float(zc_l), float(lz)),
        "hila": hila,
        "carina": carina,
    }
    return hu, lungs, info


def _body_wall(grid: _Grid, u: _Uniform, s: float) -> tuple[np.ndarray, _Torso]:
    """HU of the body (fat, chest-wall muscle, soft tissue inside) on air, and the body outline."""
    x, y, z = grid.x, grid.y, grid.z
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
    return hu, _Torso(s, A0, B0, hz, yc, rho_body, body, rho_mus_in, inner)


def _heart(grid: _Grid, u: _Uniform, t: _Torso) -> tuple[np.ndarray, np.ndarray]:
    """The heart's mask and a padded mask that the lungs keep clear of."""
    x, y, z = grid.x, grid.y, grid.z
    s, A0, B0, hz, yc = t.s, t.A0, t.B0, t.hz, t.yc
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
    return heart, heart_pad


def _lung_masks(grid: _Grid, u: _Uniform, t: _Torso, g, heart_pad, spine_c, vert_r) -> tuple[np.ndarray, list]:
    """Lung mask (two ellipses per slice, ``g`` their z profile) clear of heart, mediastinum and spine."""
    x, y = grid.x, grid.y
    s, A0, B0, yc, rho_body, rho_mus_in = t.s, t.A0, t.B0, t.yc, t.rho_body, t.rho_mus_in
    lungs = np.zeros(grid.shape, dtype=bool)
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
    return lungs, lung_params


def _mediastinum(hu: np.ndarray, grid: _Grid, u: _Uniform, t: _Torso, heart: np.ndarray) -> None:
    """Draw mediastinal fat, the heart and the aorta into ``hu``."""
    x, y = grid.x, grid.y
    s, A0, B0, yc, inner = t.s, t.A0, t.B0, t.yc, t.inner
    # mediastinal fat, heart, aorta
    med_fat = inner & (np.abs(x) < np.float32(0.28 * A0)) & (y - yc < np.float32(0.5 * B0))
    hu[grid.full(med_fat)] = FAT * 0.85
    hu[grid.full(heart)] = BLOOD + 8.0
    ao_c = (0.17 * A0 + u(-4, 4) * s, 0.42 * B0 + u(-4, 4) * s)
    ao_r = 12.0 * s * u(0.85, 1.15)
    aorta = (x - np.float32(ao_c[0])) ** 2 + (y - yc - np.float32(ao_c[1])) ** 2 <= ao_r**2
    hu[grid.full(aorta)] = BLOOD


def _airways(
    grid: _Grid, u: _Uniform, t: _Torso, hila: list[np.ndarray], carina_z: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Masks ``(wall, lumen)`` (bool ``[X, Y, Z]``, the wall mask holds the lumen) of the airways, and the
    carina (mm, relative to the FOV centre): the trachea above the carina, a main bronchus from the
    carina to each hilum and two lobar bronchi from each hilum into the lung."""
    s = t.s
    carina = np.array([u(-3, 3) * s, float(t.yc) - 0.02 * t.B0, carina_z])
    top = carina + np.array([0.0, 0.0, 2.0 * t.hz + 60.0])
    tubes = [(carina, top, 11.0 * s, 9.0 * s)]  # (start, end, outer radius, lumen radius)
    for hilum in hila:
        side = float(np.sign(hilum[0] - carina[0]))
        tubes.append((carina, hilum, 8.0 * s, 6.0 * s))
        for dz in (1.0, -1.0):
            d = np.array([side * 0.8, u(-0.3, 0.3), dz * u(0.6, 1.0)])
            tubes.append((hilum, hilum + d / np.linalg.norm(d) * 22.0 * s, 4.5 * s, 3.0 * s))
    wall = np.zeros(grid.shape, dtype=bool)
    lumen = np.zeros(grid.shape, dtype=bool)
    for p0, p1, r_out, r_in in tubes:
        box = grid.box_clipped(np.minimum(p0, p1) - r_out - 1.0, np.maximum(p0, p1) + r_out + 1.0)
        if box is None:
            continue
        dist = _segment_distance(*grid.sub(box), p0, p1)[0]
        wall[box] |= dist <= np.float32(r_out)
        lumen[box] |= dist <= np.float32(r_in)
    return wall, lumen, carina


def _spine(hu: np.ndarray, grid: _Grid, u: _Uniform, t: _Torso, spine_c, vert_r) -> None:
    """Draw the vertebral body (shell + marrow) with discs, canal, posterior arch and spinous process."""
    x, y, z = grid.x, grid.y, grid.z
    s, yc, body = t.s, t.yc, t.body
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


def _ribs(hu: np.ndarray, grid: _Grid, u: _Uniform, t: _Torso) -> None:
    """Draw ribs (inclined bands in a shell inside the chest wall, dropping anteriorly), cartilage, sternum."""
    x, y, z = grid.x, grid.y, grid.z
    s, A0, yc, rho_body, rho_mus_in = t.s, t.A0, t.yc, t.rho_body, t.rho_mus_in
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


def _segment_distance(px, py, pz, p0, p1) -> tuple[np.ndarray, np.ndarray]:
    """Distance (mm) of the points (px, py, pz) to the segment p0-p1, and the position ``t`` in [0, 1]
    of the closest point on it."""
    d = np.asarray(p1, dtype=np.float32) - np.asarray(p0, dtype=np.float32)
    L2 = float(d @ d) + 1e-9
    qx, qy, qz = px - np.float32(p0[0]), py - np.float32(p0[1]), pz - np.float32(p0[2])
    t = np.clip((qx * d[0] + qy * d[1] + qz * d[2]) / np.float32(L2), 0.0, 1.0)
    dist = np.sqrt((qx - t * d[0]) ** 2 + (qy - t * d[1]) ** 2 + (qz - t * d[2]) ** 2)
    return dist, t


def _segment_occupancy(px, py, pz, p0, p1, r0, r1, soft):
    """Soft occupancy of a tapered tube from p0 (radius r0) to p1 (radius r1) at points (px,py,pz)."""
    dist, t = _segment_distance(px, py, pz, p0, p1)
    r = np.float32(r0) + (np.float32(r1) - np.float32(r0)) * t
    return np.clip(0.5 + (r - dist) / np.float32(soft), 0.0, 1.0)


def _vessels(grid: _Grid, lungs: np.ndarray, info: dict, rng: np.random.Generator) -> np.ndarray:
    """Soft occupancy [X,Y,Z] of the pulmonary vessels, masked to the lungs: a branching tree from each
    hilum and long vessels running cranio-caudally through each lung (:func:`_axial_vessels`)."""
    occ = np.zeros(grid.shape, dtype=np.float32)
    s = info["scale"]
    soft = float(min(grid.spacing[:2].min(), 1.2))
    segments = []
    for hilum, (cx, _cy, _lx, _ly) in zip(info["hila"], info["lungs"], strict=True):
        side = np.sign(cx)
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
    segments += _axial_vessels(grid, info, rng)
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


def _axial_vessels(grid: _Grid, info: dict, rng: np.random.Generator) -> list[tuple]:
    """Segments ``(p0, p1, r0, r1)`` of 7-10 vessels per lung running cranio-caudally through the FOV.

    Each follows a slow random walk in the lung's normalised cross-section (so it stays inside the lung
    as the lung narrows towards the apex and the base), 3-8 mm across (thinner where the lung narrows):
    in an axial slice, round bright sections of nodule size."""
    s = info["scale"]
    zc, lz = info["lung_z"]
    half = 0.5 * float(grid.extent[2]) + 10.0
    z_lo, z_hi = max(zc - 0.97 * lz, -half), min(zc + 0.97 * lz, half)
    if z_hi <= z_lo:
        return []
    knots = np.linspace(z_lo, z_hi, max(2, int(np.ceil((z_hi - z_lo) / 18.0)) + 1))
    g = np.sqrt(np.clip(1.0 - ((knots - zc) / lz) ** 2, 0.0, 1.0))
    segments = []
    for cx, cy, lx, ly in info["lungs"]:
        for _ in range(int(rng.integers(7, 11))):
            r = float(rng.uniform(1.5, 4.0)) * s
            rad, ang = 0.8 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            ab = np.array([rad * np.cos(ang), rad * np.sin(ang)])
            pts = []
            for gk, zk in zip(g, knots, strict=True):
                pts.append((cx + ab[0] * lx * gk, info["yc"] + cy + ab[1] * ly * gk, zk, r * (0.5 + 0.5 * gk)))
                ab = ab + rng.normal(0.0, 0.05, 2)
                ab *= min(1.0, 0.85 / max(float(np.hypot(*ab)), 1e-9))
            for a, b in zip(pts[:-1], pts[1:], strict=True):
                segments.append((np.array(a[:3]), np.array(b[:3]), a[3], b[3]))
    return segments


def _fissures(hu: np.ndarray, grid: _Grid, lungs: np.ndarray, info: dict, rng: np.random.Generator) -> None:
    """Draw the fissures into ``hu`` (in the lungs): thin, slightly denser sheets (peak about -600 HU,
    about 2 mm thick), an oblique fissure in each lung (from posterior-superior to anterior-inferior,
    slightly bowed) and a horizontal one in the right lung, in front of the oblique one."""
    s = info["scale"]
    zc, _lz = info["lung_z"]
    for cx, cy, lx, ly in info["lungs"]:
        yc = info["yc"] + cy
        box = grid.box_clipped(np.array([cx - lx, yc - ly, -1e4]), np.array([cx + lx, yc + ly, 1e4]))
        if box is None:
            continue
        px, py, pz = grid.sub(box)
        y0, z0 = yc + rng.uniform(-0.1, 0.15) * ly, zc + rng.uniform(-10, 10)
        k, bow = rng.uniform(0.9, 1.4), rng.uniform(-20, 20) * s
        oblique = (pz - np.float32(z0)) - np.float32(k) * (py - np.float32(y0))
        oblique -= np.float32(bow) * ((px - np.float32(cx)) / np.float32(lx)) ** 2
        sd = np.abs(oblique) / np.float32(np.hypot(1.0, k))
        if cx < 0:  # patient right: the horizontal fissure, anterior to the oblique one
            zh, tilt = z0 + rng.uniform(10, 30) * s, rng.uniform(-0.15, 0.15)
            horiz = np.abs(pz - np.float32(zh) - np.float32(tilt) * (py - np.float32(yc)))
            sd = np.minimum(sd, np.where(oblique > 0, horiz, np.float32(np.inf)))
        occ = np.clip(1.0 - sd / np.float32(_FISSURE_MM), 0.0, 1.0) * lungs[box]
        sub = hu[box]
        sub += occ * (np.float32(_FISSURE_HU) - sub)


# --------------------------------------------------------------------------- noise


def _filtered_noise_std(sigma: float, truncate: float, ndim: int) -> float:
    """Std of unit white noise after ``ndimage.gaussian_filter`` along ``ndim`` axes."""
    radius = int(truncate * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w /= w.sum()
    return float(np.sum(w**2)) ** (ndim / 2.0)


def _ct_noise(rng: np.random.Generator, size: tuple[int, ...], noise_hu: float) -> np.ndarray:
    """CT noise (float32 ``size``): white noise, slightly correlated in plane, of std ``noise_hu``."""
    noise = rng.standard_normal(size, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0.6, 0.6, 0.0), mode="wrap", truncate=2.5)
    noise *= np.float32(noise_hu / _filtered_noise_std(0.6, 2.5, 2))
    return noise
