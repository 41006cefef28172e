"""Target-specific localization (ROI models): exact shares on hand-made cases, ROI feature views against a
slow pixel-by-pixel reference, and ``evaluate`` with an ROI model end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medvit_explain.cli import _add_commands, cli
from medvit_explain.io import load_volume, write_volume
from medvit_explain.metrics.masks import roi_masks
from medvit_explain.phantom import make_phantoms
from medvit_explain.prediction import model_inputs
from medvit_explain.volume import Volume
from medvit_explain.workflows.target_localization import (
    evidence_shares,
    features_path,
    item_shares,
    summarise_shares,
)

from .models import tiny_checkpoint, tiny_model


def test_evidence_shares_by_hand():
    """share = positive mass on the label / positive mass on the nodule; negative values do not count."""
    features = np.array([[[0, 2, 2], [1, 1, 0]], [[1, 1, 1], [1, 0, 0]], [[0, 2, 1], [0, 0, 0]]])
    maps = np.array([[[5.0, 1.0, 2.0], [3.0, -4.0, 9.0]], [[1.0, 1, 1], [1, 0, 0]], [[1.0, -1.0, -2.0], [0, 0, 0]]])
    share, area = evidence_shares(maps, features, 2)
    # item 0: label-2 pixels carry 1 + 2, the nodule (labels > 0) 1 + 2 + 3 + 0 (the -4 is clipped)
    assert share[0] == pytest.approx(3 / 6) and area[0] == pytest.approx(2 / 4)
    assert np.isnan(share[1]) and np.isnan(area[1])  # label 2 absent
    assert np.isnan(share[2]) and area[2] == pytest.approx(1 / 2)  # no positive evidence on the nodule


def test_item_shares_batched_equal_a_loop():
    """Shares computed in batches and averaged equal a plain loop over the items."""
    rng = np.random.default_rng(0)
    names = ["malignancy", "spiculation", "texture", "margin"]
    maps = torch.from_numpy(rng.normal(size=(7, 4, 6, 6)))
    features = rng.integers(0, 6, size=(7, 6, 6))
    features[3] = 0  # a view without any part
    batched = summarise_shares([item_shares(maps[i : i + 3], features[i : i + 3], names) for i in range(0, 7, 3)])
    assert set(batched) == {"spiculation", "texture"}  # margin has no part of its own
    # spicules raise the spiculation score; ground glass lowers texture (5 = solid): its evidence is the negative part
    for name, label, t, sign in (("spiculation", 2, 1, 1.0), ("texture", 5, 2, -1.0)):
        own, ref, area = [], [], []
        for i in range(7):
            pos = np.maximum(maps[i].numpy(), 0)
            mine = np.maximum(sign * maps[i, t].numpy(), 0)
            nodule, part = features[i] > 0, features[i] == label
            if not part.any() or mine[nodule].sum() == 0 or pos[0][nodule].sum() == 0:
                continue
            own.append(mine[part].sum() / mine[nodule].sum())
            ref.append(pos[0][part].sum() / pos[0][nodule].sum())
            area.append(part.sum() / nodule.sum())
        assert batched[name]["n"] == len(own)
        assert batched[name]["own"] == pytest.approx(np.mean(own), abs=1e-12)
        assert batched[name]["malignancy"] == pytest.approx(np.mean(ref), abs=1e-12)
        assert batched[name]["area"] == pytest.approx(np.mean(area), abs=1e-12)


@pytest.mark.parametrize("image_size", [(16, 16), (24, 24)])
def test_roi_masks_equal_a_pixel_by_pixel_reference(image_size):
    """Each model pixel of each view gets the label of the source voxel nearest to the plane sample it was
    resized from (pixel centres, ``nearest-exact``: sample floor((p + 0.5) · n / size)), located with
    ``RoiInputs.pixel_to_voxel``, on an anisotropic, flipped grid with a distinct label on every voxel."""
    rng = np.random.default_rng(3)
    volume = Volume(
        rng.normal(-500, 300, (40, 36, 14)).astype(np.float32),
        np.array([10.0, -20.0, 5.0]),
        np.array([1.3, 1.1, 2.0]),
        np.diag([-1.0, 1.0, 1.0]),
        {},
    )
    labels = (np.arange(np.prod(volume.shape)).reshape(volume.shape) % 251).astype(np.int32)
    model = tiny_model(mode="roi", image_size=image_size)
    centres = np.array([volume.index_to_physical(np.array([20.0, 17.0, 7.0])), volume.index_to_physical([9.0, 25, 4])])
    inputs = model_inputs(model, volume, roi_centers=centres)
    got = roi_masks(labels, inputs)
    h, w = image_size
    n = inputs.n

    def centre_of_sample(p: int, size: int) -> float:  # the model pixel whose centre is plane sample p's
        return (np.floor((p + 0.5) * n / size) + 0.5) * size / n - 0.5

    for item in range(inputs.n_inputs):
        r, v = divmod(item, len(inputs.views))
        for row in range(h):
            for col in range(w):
                at = inputs.pixel_to_voxel(r, inputs.views[v], centre_of_sample(row, h), centre_of_sample(col, w))
                ijk = np.rint(at).astype(int)
                inside = np.all((ijk >= 0) & (ijk < np.array(volume.shape)))
                expected = labels[tuple(ijk)] if inside else 0
                assert got[item, row, col] == expected, (item, row, col)


def _features_from_mask(folder, name: str) -> None:
    """A stand-in features map: the upper half (in z) of each nodule is 'spicules', the lower half 'core'."""
    mask = load_volume(folder / f"{name}_nodules.nii.gz")
    feats = np.zeros(mask.shape, np.int16)
    for label in np.unique(mask.array[mask.array > 0]):
        zs = np.nonzero(mask.array == label)[2]
        mid = (zs.min() + zs.max()) / 2
        inside = mask.array == label
        z = np.arange(mask.shape[2])[None, None, :]
        feats[inside & (z >= mid)] = 2
        feats[inside & (z < mid)] = 1
    write_volume(mask.with_array(feats), folder / f"{name}_features.nii.gz", dtype=np.int16)


def test_evaluate_with_an_roi_model(tmp_path):
    """``evaluate`` with an ROI model: nodule-level scores and the target localization in metrics.json,
    the CLI table and evaluation.html; the shares equal a direct computation on the same views."""
    from medvit_explain.explainers import explain, upsample

    data = tmp_path / "data"
    make_phantoms(data, seed=5, count=2, size=(48, 48, 20), spacing=(2.0, 2.0, 2.5))
    for labels in sorted(data.glob("*.json")):
        _features_from_mask(data, labels.stem)
    ckpt = tiny_checkpoint(tmp_path / "roi", mode="roi")
    _add_commands()
    out = tmp_path / "eval"
    args = ["evaluate", str(data), "--model", str(ckpt), "--method", "cdam", "--method", "attention"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "target-specific localization" in result.output and "spiculation" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "roi" and metrics["n_views"] == 3 * metrics["n_nodules"]
    auc = metrics["model"]["malignancy_auc"]
    assert auc is None or 0.0 <= auc <= 1.0
    loc = metrics["target_localization"]
    assert set(loc) == {"cdam", "attention"} and loc["cdam"]["spiculation"]["feature"] == "spicules"
    # class-agnostic attention: the same map for every target, so own == malignancy
    assert loc["attention"]["spiculation"]["own"] == pytest.approx(loc["attention"]["spiculation"]["malignancy"])
    assert "Target-specific localization" in (out / "evaluation.html").read_text()
    # the same numbers, computed directly
    from medvit_explain.model import load_model
    from medvit_explain.workflows.roi_evaluation import load_roi_views
    from medvit_explain.workflows.studies import find_studies

    model = load_model(ckpt, device="cpu")
    views = load_roi_views(find_studies(data), model, progress=False)
    names = model.task_spec.names
    maps = upsample(explain(model, views.images, "cdam", targets=list(range(len(names)))), views.images.shape[-2:])
    direct = summarise_shares([item_shares(maps, views.features, names)])
    for key in ("own", "malignancy", "area", "n"):
        assert loc["cdam"]["spiculation"][key] == pytest.approx(direct["spiculation"][key], abs=1e-9)
    assert features_path(data / "phantom_000.nii.gz") == data / "phantom_000_features.nii.gz"


def test_non_negative_maps_are_taken_as_they_are():
    """A method whose maps are never negative encodes no direction: the texture map's share on ground glass
    is its plain share (not the empty negative part), and the result says the maps were unsigned."""
    rng = np.random.default_rng(1)
    names = ["malignancy", "texture"]
    maps = torch.from_numpy(rng.random((5, 2, 4, 4)))
    features = rng.integers(0, 6, size=(5, 4, 4))
    summary = summarise_shares([item_shares(maps, features, names)])["texture"]
    share, _ = evidence_shares(maps[:, 1], features, 5)
    ref, _ = evidence_shares(maps[:, 0], features, 5)
    valid = np.isfinite(share) & np.isfinite(ref)
    assert summary["signed"] is False and summary["own"] == pytest.approx(share[valid].mean())


def test_cube_masks_equal_a_voxel_by_voxel_reference():
    """A volumetric model's ROI masks: each model voxel gets the label of the source voxel nearest to the cube
    sample it was resized from (located with ``CubeInputs.voxel_to_source``), on a flipped anisotropic grid."""
    rng = np.random.default_rng(4)
    volume = Volume(
        rng.normal(-500, 300, (30, 28, 14)).astype(np.float32),
        np.array([10.0, -20.0, 5.0]),
        np.array([1.3, 1.1, 2.0]),
        np.diag([-1.0, 1.0, -1.0]),
        {},
    )
    labels = (np.arange(np.prod(volume.shape)).reshape(volume.shape) % 251).astype(np.int32)
    model = tiny_model(mode="roi", image_size=(8, 16, 24), patch=8)  # cube of 16 samples, resized per axis
    inputs = model_inputs(model, volume, roi_centers=volume.index_to_physical(np.array([[15.0, 13.0, 7.0]])))
    got = roi_masks(labels, inputs)
    assert got.shape == (1, 8, 16, 24)
    n = inputs.n

    def centre_of_sample(p: int, size: int) -> float:
        return (np.floor((p + 0.5) * n / size) + 0.5) * size / n - 0.5

    for d, row, col in np.ndindex(8, 16, 24):
        at = inputs.voxel_to_source(0, centre_of_sample(d, 8), centre_of_sample(row, 16), centre_of_sample(col, 24))
        ijk = np.rint(at).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(volume.shape)))
        assert got[0, d, row, col] == (labels[tuple(ijk)] if inside else 0), (d, row, col)


def test_evaluate_with_a_volumetric_roi_model(tmp_path):
    """``evaluate`` with a 3D ROI model: one input per nodule, target localization over the whole cube,
    equal to a direct computation on the same cubes."""
    from medvit_explain.explainers import explain, upsample
    from medvit_explain.model import load_model
    from medvit_explain.workflows.roi_evaluation import load_roi_views
    from medvit_explain.workflows.studies import find_studies

    data = tmp_path / "data"
    make_phantoms(data, seed=6, count=2, size=(48, 48, 20), spacing=(2.0, 2.0, 2.5))
    for labels in sorted(data.glob("*.json")):
        _features_from_mask(data, labels.stem)
    ckpt = tiny_checkpoint(tmp_path / "roi3d", mode="roi", image_size=(16, 16, 16), patch=8)
    _add_commands()
    out = tmp_path / "eval"
    args = ["evaluate", str(data), "--model", str(ckpt), "--method", "cdam", "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "roi" and metrics["n_views"] == metrics["n_nodules"]
    model = load_model(ckpt, device="cpu")
    views = load_roi_views(find_studies(data), model, progress=False)
    assert views.features.shape[1:] == (16, 16, 16)
    names = model.task_spec.names
    maps = upsample(explain(model, views.images, "cdam", targets=list(range(len(names)))), views.images.shape[2:])
    direct = summarise_shares([item_shares(maps, views.features, names)])
    for key in ("own", "malignancy", "area", "n"):
        got = metrics["target_localization"]["cdam"]["spiculation"][key]
        assert got == pytest.approx(direct["spiculation"][key], abs=1e-9)
