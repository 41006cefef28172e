"""Synthetic chest-CT phantoms: determinism, labels that match the masks, plausible HU, file outputs."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import SimpleITK as sitk

from medvit_explain.phantom import (
    NODULE_KEYS,
    _sample_attributes,
    generate_phantom,
    make_phantom_groups,
    make_phantoms,
    malignancy_rule,
    malignancy_score,
    slice_labels,
    write_phantom,
)

SIZE = (128, 128, 48)
SPACING = (2.8, 2.8, 3.3)  # same 358 x 358 x 158 mm field of view as the defaults, fewer voxels


@pytest.fixture(scope="module")
def phantoms():
    return [generate_phantom(s, size=SIZE, spacing=SPACING, n_nodules=3) for s in range(4)]


def _read(path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_identical_files_other_seed_differs(tmp_path):
    a = make_phantoms(tmp_path / "a", seed=11, count=2, size=(64, 64, 24), spacing=SPACING)
    make_phantoms(tmp_path / "b", seed=11, count=2, size=(64, 64, 24), spacing=SPACING)
    c = make_phantoms(tmp_path / "c", seed=12, count=1, size=(64, 64, 24), spacing=SPACING)
    assert [r["name"] for r in a] == ["phantom_000", "phantom_001"]
    assert a[0]["seed"] != a[1]["seed"]
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(fa) == sorted(
        [
            "phantom_000.json",
            "phantom_000.nii.gz",
            "phantom_000_features.nii.gz",
            "phantom_000_lungs.nii.gz",
            "phantom_000_nodules.nii.gz",
            "phantom_001.json",
            "phantom_001.nii.gz",
            "phantom_001_features.nii.gz",
            "phantom_001_lungs.nii.gz",
            "phantom_001_nodules.nii.gz",
        ]
    )
    assert fa == fb  # byte-identical, gzip headers included
    assert fa["phantom_000.nii.gz"] != fa["phantom_001.nii.gz"]
    assert _files(tmp_path / "c")["phantom_000.nii.gz"] != fa["phantom_000.nii.gz"]
    assert c[0]["json"].name == "phantom_000.json"


def test_phantom_groups_nodule_count(tmp_path):
    """A group's ``nodules`` puts that many nodules in each of its phantoms (the ROI recipe's dense
    phantoms); without it the count is the generator's 0-3, the same phantoms as make_phantoms gives."""
    groups = [
        {"count": 2, "size": [128, 128, 48], "spacing": list(SPACING), "nodules": 5},
        {"count": 2, "size": [64, 64, 24], "spacing": list(SPACING)},
    ]
    out = make_phantom_groups(tmp_path / "g", groups, seed=7)
    assert [r["name"] for r in out] == ["grid0_000", "grid0_001", "grid1_000", "grid1_001"]
    assert [len(r["nodules"]) for r in out[:2]] == [5, 5]
    plain = make_phantoms(tmp_path / "p", seed=7 + 100, count=2, size=(64, 64, 24), spacing=SPACING)
    assert [r["seed"] for r in out[2:]] == [r["seed"] for r in plain]
    assert [r["nodules"] for r in out[2:]] == [r["nodules"] for r in plain]


def test_phantom_sets_made_in_processes_are_the_same_files(tmp_path):
    """``workers`` spreads a set's phantoms (across all its groups) over spawned processes: the same files,
    byte for byte, and the same returned records, in order, as made one after another."""
    groups = [
        {"count": 2, "size": [64, 64, 16], "spacing": list(SPACING), "nodules": 2},
        {"count": 1, "size": [48, 48, 16], "spacing": list(SPACING)},
    ]
    one = make_phantom_groups(tmp_path / "one", groups, seed=11)
    two = make_phantom_groups(tmp_path / "two", groups, seed=11, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two") and len(_files(tmp_path / "one")) == 15
    assert [(r["name"], r["seed"], r["nodules"]) for r in one] == [(r["name"], r["seed"], r["nodules"]) for r in two]
    assert [r["ct"].parent for r in two] == [tmp_path / "two"] * 3
    plain = make_phantoms(tmp_path / "p", seed=11, count=2, size=(48, 48, 16), spacing=SPACING, workers=2)
    assert [r["name"] for r in plain] == ["phantom_000", "phantom_001"]


def test_in_memory_determinism():
    p1 = generate_phantom(3, size=(64, 64, 16), spacing=SPACING, n_nodules=2)
    p2 = generate_phantom(3, size=(64, 64, 16), spacing=SPACING, n_nodules=2)
    np.testing.assert_array_equal(p1.ct.array, p2.ct.array)
    np.testing.assert_array_equal(p1.nodule_mask.array, p2.nodule_mask.array)
    assert p1.nodules == p2.nodules


def test_nodule_labels_match_masks(phantoms):
    n_total = 0
    for ph in phantoms:
        mask, lungs, ct = ph.nodule_mask.array, ph.lung_mask.array, ph.ct
        assert mask.dtype == np.int16 and lungs.dtype == np.uint8 and ct.array.dtype == np.float32
        assert ph.nodule_mask.same_grid(ct) and ph.lung_mask.same_grid(ct)
        ids = sorted(int(i) for i in np.unique(mask) if i > 0)
        assert ids == [n["id"] for n in ph.nodules] == list(range(1, len(ph.nodules) + 1))
        assert np.all(lungs[mask > 0] == 1), "nodules must lie inside the lungs"
        voxel_mm3 = float(np.prod(ct.spacing))
        for n in ph.nodules:
            n_total += 1
            assert tuple(n) == NODULE_KEYS
            idx = np.argwhere(mask == n["id"])
            centroid = ct.index_to_physical(idx.mean(0))
            assert np.linalg.norm(centroid - np.array(n["center_mm"])) < 2.0
            d_eq = (6 * len(idx) * voxel_mm3 / np.pi) ** (1 / 3)
            assert abs(d_eq - n["diameter_mm"]) < 0.02 * n["diameter_mm"] + 0.05
            pts = ct.index_to_physical(idx)
            diagonal = np.linalg.norm(pts.max(0) - pts.min(0))  # bounding-box diagonal, LPS mm
            assert 0.7 * n["diameter_mm"] <= diagonal + 2 * ct.spacing.max()
            assert diagonal <= 4.0 * n["diameter_mm"] + 2 * ct.spacing.max()
            assert 3.0 <= n["diameter_mm"] <= 32.0
            for key, hi in (
                ("subtlety", 5),
                ("calcification", 6),
                ("margin", 5),
                ("lobulation", 5),
                ("spiculation", 5),
                ("texture", 5),
                ("sphericity", 5),
            ):
                assert 1 <= n[key] <= hi and isinstance(n[key], int)
            assert n["malignancy"] == malignancy_rule(n)  # no label noise asked
    assert n_total >= 8


def test_hu_ranges_plausible(phantoms):
    for ph in phantoms:
        ct, lungs = ph.ct.array, ph.lung_mask.array.astype(bool)
        assert ct.min() >= -1024 and np.all(ct == np.rint(ct))
        assert -900 < np.median(ct[lungs & (ph.nodule_mask.array == 0)]) < -780
        corner = ct[:8, :8, :]
        assert -1024 <= np.median(corner) <= -980
        body = ct > -500
        cx = ct.shape[0] // 2
        centre_col = ct[cx - 3 : cx + 3, :, :]
        assert np.any((centre_col > 20) & (centre_col < 80))  # soft tissue / heart
        assert (ct > 500).sum() > 100  # bone: spine and ribs
        assert ct.max() < 3072
        area = body.sum(axis=(0, 1))
        assert area.max() - area.min() > 0.01 * area.mean()  # the body changes along z
        assert 0.05 < lungs.mean() < 0.35


def test_nodules_change_the_image():
    ph = generate_phantom(5, size=SIZE, spacing=SPACING, n_nodules=3)
    ct, mask = ph.ct.array, ph.nodule_mask.array
    for n in ph.nodules:
        inside = ct[mask == n["id"]].mean()
        assert inside > -800, f"nodule {n} not visible: mean {inside}"


def test_malignancy_rule_monotonic_examples():
    base = {
        "diameter_mm": 10.0,
        "spiculation": 2,
        "lobulation": 2,
        "margin": 4,
        "sphericity": 4,
        "texture": 5,
        "calcification": 6,
        "subtlety": 3,
    }
    for key, values in (
        ("diameter_mm", [4, 6, 8, 12, 20, 30]),
        ("spiculation", [1, 2, 3, 4, 5]),
        ("lobulation", [1, 2, 3, 4, 5]),
    ):
        scores = [malignancy_score({**base, key: v}) for v in values]
        assert scores == sorted(scores), key
    for key, values in (("margin", [1, 2, 3, 4, 5]), ("sphericity", [1, 2, 3, 4, 5])):
        scores = [malignancy_score({**base, key: v}) for v in values]
        assert scores == sorted(scores, reverse=True), key
    for calc in range(1, 6):
        assert malignancy_score({**base, "calcification": calc}) < malignancy_score(base)
    assert malignancy_score({**base, "texture": 3}) > malignancy_score({**base, "texture": 5})
    suspicious = {
        "diameter_mm": 24,
        "spiculation": 5,
        "lobulation": 4,
        "margin": 2,
        "sphericity": 2,
        "texture": 3,
        "calcification": 6,
    }
    benign = {
        "diameter_mm": 5,
        "spiculation": 1,
        "lobulation": 1,
        "margin": 5,
        "sphericity": 5,
        "texture": 5,
        "calcification": 3,
    }
    assert malignancy_rule(suspicious) == 1 and malignancy_rule(benign) == 0
    assert malignancy_rule({**suspicious, "calcification": 5, "diameter_mm": 8, "spiculation": 2}) == 0
    assert malignancy_rule({**benign, "calcification": 6, "diameter_mm": 22, "spiculation": 3}) == 1


def test_attribute_sampling_roughly_balanced():
    rng = np.random.default_rng(0)
    attrs = [_sample_attributes(rng) for _ in range(3000)]
    labels = np.array([malignancy_rule(a) for a in attrs])
    assert 0.4 <= labels.mean() <= 0.6
    d = np.array([a["diameter_mm"] for a in attrs])
    assert d.min() >= 4.0 and d.max() <= 30.0
    assert d[labels == 1].mean() > d[labels == 0].mean() + 5


def test_label_noise_flips():
    clean = generate_phantom(2, size=SIZE, spacing=SPACING, n_nodules=3)
    noisy = generate_phantom(2, size=SIZE, spacing=SPACING, n_nodules=3, label_noise=1.0)
    assert [n["malignancy"] for n in noisy.nodules] == [1 - n["malignancy"] for n in clean.nodules]
    np.testing.assert_array_equal(clean.ct.array, noisy.ct.array)


def test_slice_labels(tmp_path, phantoms):
    ph = phantoms[0]
    labels = slice_labels(ph)
    mask = ph.nodule_mask.array
    assert len(labels) == mask.shape[2]
    by_id = {n["id"]: n for n in ph.nodules}
    for k, rec in enumerate(labels):
        ids = sorted(int(i) for i in np.unique(mask[:, :, k]) if i > 0)
        if not ids:
            assert rec is None
            continue
        assert rec["nodule_ids"] == ids
        assert rec["malignancy"] == max(by_id[i]["malignancy"] for i in ids)
        areas = {i: (mask[:, :, k] == i).sum() for i in ids}
        assert rec["largest_id"] == max(areas, key=areas.get)
        assert rec["spiculation"] == by_id[rec["largest_id"]]["spiculation"]
    paths = write_phantom(ph, tmp_path, "case")
    from_files = slice_labels(paths["json"], paths["nodule_mask"])
    assert from_files == labels
    big = slice_labels(ph, min_area_mm2=50.0)
    assert sum(r is not None for r in big) <= sum(r is not None for r in labels)


def test_write_nifti_and_dicom_geometry(tmp_path):
    d = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # i, j swapped: left-handed
    rot = np.array([[np.cos(0.3), -np.sin(0.3), 0.0], [np.sin(0.3), np.cos(0.3), 0.0], [0, 0, 1.0]])
    direction = rot @ d
    ph = generate_phantom(
        4, size=(96, 80, 20), spacing=(3.5, 4.0, 5.0), n_nodules=2, direction=direction, origin=(10.0, -20.0, 30.0)
    )
    paths = write_phantom(ph, tmp_path, "obl", format="dicom")
    assert set(paths) == {"ct", "nodule_mask", "lung_mask", "features", "json", "dicom"}
    img, arr = _read(paths["ct"])
    assert img.GetPixelID() == sitk.sitkInt16
    np.testing.assert_allclose(img.GetOrigin(), (10.0, -20.0, 30.0), atol=1e-5)
    np.testing.assert_allclose(img.GetSpacing(), (3.5, 4.0, 5.0), atol=1e-5)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), direction, atol=1e-6)
    np.testing.assert_array_equal(arr, ph.ct.array)
    for key, vol in (("nodule_mask", ph.nodule_mask), ("lung_mask", ph.lung_mask), ("features", ph.features)):
        m_img, m_arr = _read(paths[key])
        np.testing.assert_array_equal(m_arr, vol.array)
        np.testing.assert_allclose(m_img.GetOrigin(), img.GetOrigin())
        np.testing.assert_allclose(m_img.GetDirection(), img.GetDirection(), atol=1e-12)
    meta = json.loads(paths["json"].read_text())
    assert meta["nodules"] == ph.nodules and meta["seed"] == 4
    assert meta["size"] == [96, 80, 20] and meta["spacing"] == [3.5, 4.0, 5.0]
    assert "generator_version" in meta

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(paths["dicom"])))
    series = reader.Execute()
    s_arr = sitk.GetArrayFromImage(series).transpose(2, 1, 0)
    # k runs against the slice normal here, so the reader returns the slices in reverse order
    np.testing.assert_array_equal(s_arr[:, :, ::-1], arr)
    last = ph.ct.index_to_physical(np.array([0, 0, arr.shape[2] - 1]))
    np.testing.assert_allclose(series.GetOrigin(), last, atol=1e-3)
    np.testing.assert_allclose(series.GetSpacing(), img.GetSpacing(), atol=1e-4)
    flipped = direction.copy()
    flipped[:, 2] *= -1
    np.testing.assert_allclose(np.reshape(series.GetDirection(), (3, 3)), flipped, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_dicom_equals_nifti_axis_aligned(tmp_path):
    ph = generate_phantom(6, size=(64, 64, 12), spacing=SPACING, n_nodules=1)
    paths = write_phantom(ph, tmp_path, "ax", format="dicom")
    img, arr = _read(paths["ct"])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(paths["dicom"])))
    series = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(series).transpose(2, 1, 0), arr)
    np.testing.assert_allclose(series.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(series.GetSpacing(), img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(series.GetDirection(), img.GetDirection(), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        generate_phantom(0, size=(10, 10))
    with pytest.raises(ValueError, match="label_noise"):
        generate_phantom(0, size=(16, 16, 4), label_noise=2.0)
    with pytest.raises(ValueError, match="orthonormal"):
        generate_phantom(0, size=(16, 16, 4), direction=np.ones((3, 3)))
    with pytest.raises(ValueError, match="format"):
        write_phantom(generate_phantom(0, size=(16, 16, 4), n_nodules=0), "/tmp", "x", format="png")


def test_default_size_is_fast():
    t0 = time.perf_counter()
    ph = generate_phantom(0)
    elapsed = time.perf_counter() - t0
    assert ph.ct.shape == (256, 256, 64)
    assert elapsed < 8.0, f"256x256x64 phantom took {elapsed:.1f} s (target < 3 s on a free core)"


def test_make_phantom_cli_workers(tmp_path):
    """``make-phantom --workers 2`` writes the same files as one process."""
    from click.testing import CliRunner

    from medvit_explain.cli import cli

    base = ["--seed", "3", "--count", "2", "--size", "48", "48", "16"]
    for folder, extra in (("one", []), ("two", ["--workers", "2"])):
        result = CliRunner().invoke(cli, ["make-phantom", str(tmp_path / folder), *base, *extra])
        assert result.exit_code == 0, result.output
        assert "wrote 2 phantom(s)" in result.output
    assert _files(tmp_path / "one") == _files(tmp_path / "two") and len(_files(tmp_path / "one")) == 10
