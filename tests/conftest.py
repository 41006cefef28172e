import os

import numpy as np
import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """A proper rotation matrix from three angles (radians)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# (name, direction columns in LPS, spacing)
GEOMETRIES = [
    ("identity", np.eye(3), (0.7, 0.7, 1.25)),
    ("flipped", np.diag([-1.0, 1.0, -1.0]), (0.8, 0.6, 2.0)),
    ("permuted", np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]), (1.0, 2.0, 0.5)),
    ("oblique", rotation(0.3, -0.2, 0.5), (0.7, 0.9, 1.5)),
]
