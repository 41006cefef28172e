"""Generator 2.1 (``generate_phantom(..., generator_version="2.1")``): the shape grades (sphericity,
lobulation, margin) are steps a model can see at the grid; 2.2 makes each lobulation step at least 1 mm on any
grid; the default generator 2.0 is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medvit_explain.phantom import GENERATOR_VERSION, GENERATOR_VERSIONS, generate_phantom, make_phantoms
from medvit_explain.phantom.nodules import GRADES, _sample_attributes, _Shape

ROOT = Path(__file__).resolve().parents[1]
V21 = GRADES["2.1"]

PLAIN = {"spiculation": 1, "lobulation": 1, "texture": 5, "calcification": 6, "margin": 4, "sphericity": 5}


def _axis_ratio(points_mm: np.ndarray) -> float:
    """Long / short axis of a point cloud from its second moments (an ellipsoid's a / c)."""
    ev = np.linalg.eigvalsh(np.cov(points_mm.T))
    return float(np.sqrt(ev[-1] / ev[0]))


@pytest.mark.parametrize("seed", [0, 1])
def test_each_sphericity_grade_is_a_visible_elongation(seed):
    """Measured on the drawn voxels (1.4 x 1.4 x 2.5 mm), each grade down is more elongated than the one
    above by a clear step, and grade 1 (LIDC "linear") is over 2:1."""
    ratios = {}
    for grade in (5, 4, 3, 2, 1):
        attrs = [{**PLAIN, "sphericity": grade, "diameter_mm": 14, "subtlety": 5}]
        ph = generate_phantom(40 + seed, nodule_attributes=attrs, generator_version="2.1")
        assert len(ph.nodules) == 1
        idx = np.argwhere(ph.nodule_mask.array == 1)
        ratios[grade] = _axis_ratio(ph.ct.index_to_physical(idx))
    for grade in (4, 3, 2, 1):
        expected = V21.elongation[grade] / V21.elongation[grade + 1]
        assert ratios[grade] / ratios[grade + 1] > 1.0 + 0.6 * (expected - 1.0), ratios
    assert ratios[5] < 1.2 and ratios[1] > 2.2, ratios


def test_elongated_nodules_keep_their_long_axis_under_the_cap():
    rng = np.random.default_rng(3)
    cut = 0
    for _ in range(2000):
        a = _sample_attributes(rng, V21)
        long_axis = a["diameter_mm"] * V21.elongation[a["sphericity"]] ** (2 / 3)
        assert long_axis <= V21.long_axis_max_mm + 1e-9
        assert a["diameter_mm"] >= 4.0
        cut += long_axis > V21.long_axis_max_mm - 1e-9
    assert 0 < cut < 200  # the cut touches the large elongated nodules only


@pytest.mark.parametrize(
    "version,voxel_mm,floor_mm", [("2.1", 1.12, 0.56), ("2.1", 2.24, 1.12), ("2.2", 0.7, 1.0), ("2.2", 2.24, 1.12)]
)
@pytest.mark.parametrize("diameter_mm", [6.0, 10.0, 20.0])
def test_each_lobulation_grade_adds_visible_lobe_height(version, voxel_mm, floor_mm, diameter_mm):
    """The same lobes (same seed) at grades 1-5: grade k's lobes are (k - 1) steps high, a step at least
    0.12 of the radius and half an in-plane voxel (2.2: and 1 mm; times each lobe's factor 0.75-1), up to
    0.75 of the radius."""
    radius = diameter_mm / 2
    heights = {}
    for grade in range(1, 6):
        attrs = {**PLAIN, "lobulation": grade, "diameter_mm": diameter_mm}
        shape = _Shape(attrs, np.random.default_rng(7), floor_mm=GRADES[version].lobe_floor_mm(voxel_mm))
        heights[grade] = shape.lobe_amp * radius
    assert len(heights[1]) == 0
    step = max(0.12 * radius, floor_mm)
    one = heights[2]  # one step, times each lobe's factor
    assert np.all(one >= 0.75 * min(step, 0.75 * radius) * 0.999) and np.all(one <= min(step, 0.75 * radius) * 1.001)
    for grade in (3, 4, 5):
        ratio = heights[grade] / one  # the lobes' factors cancel: one number for every lobe
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
        expected = min(grade - 1, 0.75 * radius / min(step, 0.75 * radius))
        assert ratio[0] == pytest.approx(expected, rel=1e-5)
    assert np.all(heights[5] <= 0.75 * radius * 1.0001)


def test_a_lobulation_of_two_is_drawn_on_the_coarsest_sample_grid():
    """A 10 mm nodule of lobulation 2 on the sample data's 2.24 x 2.24 x 4 mm grid has lobe voxels (before
    the floor its lobes were 0.3-0.6 mm high: none), and lobulation 4 has more of them."""
    shares = {}
    for grade in (2, 4):
        ph = generate_phantom(
            9,
            size=(160, 160, 40),
            spacing=(2.24, 2.24, 4.0),
            nodule_attributes=[{**PLAIN, "lobulation": grade, "diameter_mm": 10, "subtlety": 5}],
            generator_version="2.1",
        )
        fv = ph.nodules[0]["feature_voxels"]
        shares[grade] = fv["lobulation"] / sum(fv.values())
    assert 0 < shares[2] < shares[4], shares


def test_generator_2_2_draws_bigger_lobes_than_2_1_where_half_a_voxel_is_under_1_mm():
    """On a 1.12 mm grid a 10 mm nodule's lobulation-2 step is 0.6 mm in 2.1 (0.12 of the radius) and 1 mm in
    2.2, so 2.2 draws more lobe voxels; the other grades are 2.1's."""
    assert GRADES["2.2"].elongation == V21.elongation and GRADES["2.2"].edge_mm == V21.edge_mm
    shares = {}
    for version in ("2.1", "2.2"):
        ph = generate_phantom(
            9,
            spacing=(1.12, 1.12, 2.0),
            nodule_attributes=[{**PLAIN, "lobulation": 2, "diameter_mm": 10, "subtlety": 5}],
            generator_version=version,
        )
        fv = ph.nodules[0]["feature_voxels"]
        shares[version] = fv["lobulation"] / sum(fv.values())
        assert ph.generator_version == version
    assert 0 < shares["2.1"] < shares["2.2"], shares


def test_margin_blur_grows_with_each_grade():
    widths = [V21.edge_mm[g] for g in (5, 4, 3, 2, 1)]
    assert widths[0] == 0.0 and all(b - a >= 1.0 for a, b in zip(widths, widths[1:]))


def test_versions_and_the_default():
    assert tuple(GRADES) == GENERATOR_VERSIONS and GENERATOR_VERSION == "2.0"
    ph = generate_phantom(3, size=(64, 64, 16), spacing=(5.0, 5.0, 10.0), n_nodules=1, generator_version="2.1")
    assert ph.generator_version == "2.1" and ph.ct.metadata["generator_version"] == "2.1"
    with pytest.raises(ValueError, match=r"expected generator_version one of 2.0, 2.1, 2.2, got '3.0'"):
        generate_phantom(3, size=(64, 64, 16), generator_version="3.0")


def test_the_default_generator_remakes_the_sample_data_byte_for_byte(tmp_path):
    """Generator 2.0 (the default) is what made sample_data (sample_data/README.md): the grades table did not
    change a bit of it."""
    make_phantoms(tmp_path, seed=55, count=3, size=(160, 160, 40), spacing=(2.24, 2.24, 4.0))
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in (ROOT / "sample_data").glob("phantom_00*"))
    for name in made:
        assert (tmp_path / name).read_bytes() == (ROOT / "sample_data" / name).read_bytes(), name


def test_make_phantom_generator_version_option(tmp_path):
    from click.testing import CliRunner

    from medvit_explain.cli import cli

    args = ["make-phantom", str(tmp_path / "g"), "--seed", "4", "--size", "48", "48", "16", "--spacing", "5", "5", "8"]
    result = CliRunner().invoke(cli, [*args, "--generator-version", "2.1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "g" / "phantom_000.json").read_text())["generator_version"] == "2.1"
    result = CliRunner().invoke(cli, [*args, "--generator-version", "3"])
    assert result.exit_code == 2 and "'3' is not one of '2.0', '2.1', '2.2'" in result.output
