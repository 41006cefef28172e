"""Phantoms v2: the nodule feature labels (ground truth of how each nodule is drawn) and the anatomy that
makes the task less of a cartoon (vessel sections of nodule size, airways)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from medvit_explain.phantom import FEATURE_LABELS, generate_phantom, write_phantom

SIZE = (128, 128, 48)
SPACING = (2.8, 2.8, 3.3)
PLAIN = {"spiculation": 1, "lobulation": 1, "texture": 5, "calcification": 6, "margin": 4, "sphericity": 5}
# one phantom per row, on the default 1.4 x 1.4 x 2.5 mm grid; each nodule differs from PLAIN in one feature
DESIGNS = [
    [{"spiculation": 5, "diameter_mm": 16}, {"diameter_mm": 14}, {"texture": 1, "diameter_mm": 22}],
    [{"calcification": c, "diameter_mm": 10} for c in (1, 2, 3)],
    [{"calcification": c, "diameter_mm": 10} for c in (4, 5)] + [{"lobulation": 5, "diameter_mm": 18}],
]


def _counts(features: np.ndarray, mask: np.ndarray, nid: int) -> dict[str, int]:
    per_label = np.bincount(features[mask == nid], minlength=6)
    return {name: int(per_label[k]) for k, name in FEATURE_LABELS.items()}


@pytest.fixture(scope="module")
def designed():
    """``[(phantom, requested attributes per nodule)]``; every requested nodule is placed."""
    out = []
    for seed, rows in enumerate(DESIGNS):
        attrs = [{**PLAIN, **row, "subtlety": 5} for row in rows]
        ph = generate_phantom(100 + seed, nodule_attributes=attrs)
        assert len(ph.nodules) == len(attrs)
        out.append((ph, attrs))
    return out


@pytest.fixture(scope="module")
def random_phantoms():
    return [generate_phantom(s, size=SIZE, spacing=SPACING, n_nodules=3) for s in range(3)]


def test_feature_map_is_the_mask_split_into_parts(random_phantoms, designed):
    for ph in random_phantoms + [p for p, _ in designed]:
        f, mask = ph.features.array, ph.nodule_mask.array
        assert f.dtype == np.uint8 and ph.features.same_grid(ph.ct)
        assert set(np.unique(f).tolist()) <= {0, 1, 2, 3, 4, 5}
        # documented rule: a voxel is labelled exactly when it is in a nodule's instance mask (no rim)
        np.testing.assert_array_equal(f > 0, mask > 0)
        for n in ph.nodules:
            assert n["feature_voxels"] == _counts(f, mask, n["id"])
            assert sum(n["feature_voxels"].values()) == int((mask == n["id"]).sum())


def test_features_follow_the_biomarkers(designed):
    seen = set()
    for ph, attrs in designed:
        for n, want in zip(ph.nodules, attrs, strict=True):
            fv, total = n["feature_voxels"], sum(n["feature_voxels"].values())
            for key in ("spiculation", "lobulation", "texture", "calcification"):
                assert n[key] == want[key]
            assert (fv["spicules"] > 0) == (n["spiculation"] > 1), n
            assert (fv["lobulation"] > 0) == (n["lobulation"] > 1), n
            assert (fv["calcification"] > 0) == (n["calcification"] != 6), n
            if n["texture"] == 1:
                assert fv["ground_glass"] > 0.6 * total, n
            if n["texture"] == 5:
                assert fv["ground_glass"] == 0, n
            seen.add((n["spiculation"], n["lobulation"], n["texture"], n["calcification"]))
    assert len(seen) == 9  # plain, spiculated, lobulated, ground glass and the five calcification patterns


def test_spicules_are_bright_and_lie_outside_the_body(designed):
    ph, _ = designed[0]
    ct, f, mask = ph.ct.array, ph.features.array, ph.nodule_mask.array
    spiculated = next(n for n in ph.nodules if n["spiculation"] == 5)
    spikes = (f == 2) & (mask == spiculated["id"])
    assert np.median(ct[spikes]) > -450  # a bright strand in the -850 HU lung
    assert spikes.sum() >= 15


def test_no_vessel_inside_a_nodule(designed):
    # a vessel through the ground-glass nodule would put blood (+40 HU) on its -620 HU voxels
    ph, _ = designed[0]
    ggo = next(n for n in ph.nodules if n["texture"] == 1)
    voxels = ph.ct.array[(ph.features.array == 5) & (ph.nodule_mask.array == ggo["id"])]
    assert voxels.size > 200 and voxels.max() < -450


def test_features_file_on_the_ct_grid(tmp_path):
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ph = generate_phantom(8, size=(96, 80, 24), spacing=(3.5, 4.0, 5.0), n_nodules=2, direction=direction)
    paths = write_phantom(ph, tmp_path, "case")
    assert paths["features"].name == "case_features.nii.gz"
    assert paths["features"].parent == paths["nodule_mask"].parent
    ct_img, f_img = sitk.ReadImage(str(paths["ct"])), sitk.ReadImage(str(paths["features"]))
    assert f_img.GetPixelID() == sitk.sitkUInt8
    assert f_img.GetSize() == ct_img.GetSize()
    np.testing.assert_allclose(f_img.GetOrigin(), ct_img.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(f_img.GetSpacing(), ct_img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(f_img.GetDirection(), ct_img.GetDirection(), atol=1e-9)
    f = sitk.GetArrayFromImage(f_img).transpose(2, 1, 0)
    np.testing.assert_array_equal(f, ph.features.array)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["nodule_mask"]))).transpose(2, 1, 0)
    nodules = json.loads(paths["json"].read_text())["nodules"]
    assert nodules and len(nodules) == len(ph.nodules)
    for n in nodules:
        assert {"center_mm", "diameter_mm", "malignancy", "subtlety", "calcification", "margin"} <= set(n)
        assert {"lobulation", "spiculation", "texture", "sphericity"} <= set(n)
        assert n["feature_voxels"] == _counts(f, mask, n["id"])


def test_deterministic_features():
    a = generate_phantom(3, size=(64, 64, 16), spacing=SPACING, n_nodules=2)
    b = generate_phantom(3, size=(64, 64, 16), spacing=SPACING, n_nodules=2)
    np.testing.assert_array_equal(a.features.array, b.features.array)
    np.testing.assert_array_equal(a.ct.array, b.ct.array)
    assert a.nodules == b.nodules and a.info == b.info


def test_vessel_sections_of_nodule_size():
    ph = generate_phantom(4, n_nodules=3)
    ct, lungs, mask = ph.ct.array, ph.lung_mask.array.astype(bool), ph.nodule_mask.array
    sp = ph.ct.spacing
    near_nodule = ndimage.binary_dilation(mask > 0, iterations=2)
    for k in (16, 32, 48):
        comps, n = ndimage.label((ct[:, :, k] > -500) & lungs[:, :, k])
        sizes = ndimage.sum_labels(np.ones_like(comps), comps, index=np.arange(1, n + 1))
        touching = ndimage.maximum(near_nodule[:, :, k], comps, index=np.arange(1, n + 1))
        d_eq = 2.0 * np.sqrt(sizes * sp[0] * sp[1] / np.pi)
        dots = int(np.sum((d_eq >= 3.0) & (d_eq <= 8.0) & (touching == 0)))
        assert dots >= 8, f"slice {k}: {dots} bright vessel sections of 3-8 mm outside the nodules"


def test_airway_is_air_inside_the_mediastinum():
    ph = generate_phantom(6, n_nodules=0)
    ct, lungs = ph.ct.array, ph.lung_mask.array
    carina = np.array(ph.info["carina_mm"])
    i, j, k = np.round(ph.ct.physical_to_index(carina + [0.0, 0.0, 15.0])).astype(int)
    sp = ph.ct.spacing
    assert ct[i, j, k] < -900 and lungs[i, j, k] == 0
    air, _ = ndimage.label(ct[:, :, k] < -900)
    lumen = air == air[i, j]
    area = lumen.sum() * sp[0] * sp[1]
    assert 50.0 < area < np.pi * 12.0**2  # a trachea, not the air around the body
    assert not (lumen[0].any() or lumen[-1].any() or lumen[:, 0].any() or lumen[:, -1].any())
    xx, yy = np.meshgrid(np.arange(ct.shape[0]) - i, np.arange(ct.shape[1]) - j, indexing="ij")
    r = np.hypot(xx * sp[0], yy * sp[1])
    ring = (r > 14.0) & (r < 18.0)  # around the wall: mediastinal fat and soft tissue, no lung
    assert ct[:, :, k][ring].mean() > -250 and lungs[:, :, k][ring].sum() == 0
    wall = (r > 10.5 * 0.95) & (r < 11.0 * 0.95)
    assert ct[:, :, k][wall].mean() > -200


def test_bad_nodule_attributes():
    with pytest.raises(ValueError, match="nodule attributes"):
        generate_phantom(0, size=(32, 32, 8), nodule_attributes=[{"colour": 3}])
    with pytest.raises(ValueError, match="spiculation"):
        generate_phantom(0, size=(32, 32, 8), nodule_attributes=[{"spiculation": 7}])


def test_scanners_skip_feature_maps(tmp_path):
    from medvit_explain.napari._reader import _LABEL_NAME
    from medvit_explain.viewer_logic import _MASK_SUFFIXES
    from medvit_explain.workflows.studies import find_phantoms, read_manifest

    ph = generate_phantom(1, size=(48, 48, 8), spacing=(7.5, 7.5, 20.0), n_nodules=0)
    write_phantom(ph, tmp_path, "p")
    assert [s.study_id for s in read_manifest(tmp_path)] == ["p"]
    assert [s.study_id for s in find_phantoms(tmp_path)] == ["p"]
    assert "p_features.nii.gz".endswith(_MASK_SUFFIXES)
    assert _LABEL_NAME.search("p_features")
