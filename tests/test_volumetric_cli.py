"""A volumetric model end to end: explain / predict / batch / train through the CLI, overlays on the
source grid (anisotropic and oblique inputs too) that are zero outside the ROI cubes."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from medvit_explain.cli import cli
from medvit_explain.io import load_volume, write_volume
from medvit_explain.phantom import make_phantoms
from medvit_explain.prediction import model_inputs
from medvit_explain.volume import Volume
from medvit_explain.workflows.labels import nodule_centres, read_nodules
from medvit_explain.workflows.studies import find_studies
from medvit_explain.workflows.train import load_rois

from .conftest import rotation
from .models import assert_resume_is_exact, tiny_checkpoint, tiny_config, tiny_model

CUBE = dict(image_size=(16, 16, 16), patch=8, mode="roi")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms3d")
    make_phantoms(out, seed=21, count=3, size=(96, 96, 32), spacing=(3.0, 3.0, 4.0), n_nodules=2)
    return out


@pytest.fixture(scope="module")
def cube_checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cube3d") / "ckpt", seed=3, **CUBE)


def _explain(args):
    result = CliRunner().invoke(cli, [str(a) for a in [*args, "--device", "cpu"]])
    assert result.exit_code == 0, result.output
    return result


def _oblique_copy(ct, mask, folder):
    """The same voxels under an oblique, anisotropic, flipped geometry (a scanner could write this)."""
    direction = rotation(0.25, -0.15, 0.4) @ np.diag([1.0, -1.0, 1.0])
    spacing = (1.7, 2.3, 3.1)
    paths = []
    for vol, name in ((ct, "ct.nii.gz"), (mask, "mask.nii.gz")):
        moved = Volume(vol.array, (12.0, -40.0, 7.0), spacing, direction)
        write_volume(moved, folder / name)
        paths.append(folder / name)
    return paths


def _in_cubes(inputs) -> np.ndarray:
    """Source voxels within one sample of an ROI cube: the cube is a box in (permuted, flipped) voxel index
    space, so the box of its samples' source indices, grown by one voxel, holds every voxel it can write."""
    shape = inputs.volume.shape
    inside = np.zeros(shape, bool)
    ijk = np.argwhere(np.ones(shape, bool))
    for r in range(len(inputs.centers_mm)):
        cube = inputs._cube_coords(r).reshape(3, -1)
        lo, hi = np.floor(cube.min(1)) - 1, np.ceil(cube.max(1)) + 1
        inside[tuple(ijk[np.all((ijk >= lo) & (ijk <= hi), axis=1)].T)] = True
    return inside


def _check_overlays(out, ct_path, inputs, count):
    source = nib.load(str(ct_path))
    in_cubes = _in_cubes(inputs)
    assert 0 < in_cubes.sum() < in_cubes.size
    overlays = sorted(out.glob("*.nii.gz"))
    assert len(overlays) == count
    for path in overlays:
        img = nib.load(str(path))
        assert img.shape == source.shape
        np.testing.assert_allclose(img.affine, source.affine, atol=1e-4)
        data = np.asarray(img.dataobj, dtype=np.float32)
        assert np.count_nonzero(data) > 0, path.name
        assert not np.any(data[~in_cubes]), f"{path.name}: evidence outside the ROI cubes"


@pytest.mark.parametrize("geometry", ["phantom", "oblique-anisotropic"])
def test_explain_with_roi_mask_writes_overlays_on_the_source_grid_zero_outside_the_cubes(
    phantom, cube_checkpoint, tmp_path, geometry
):
    study = find_studies(phantom)[0]
    ct_path, mask_path = study.path, study.nodule_mask
    if geometry != "phantom":
        ct_path, mask_path = _oblique_copy(load_volume(ct_path), load_volume(mask_path), tmp_path)
    out = tmp_path / "out"
    _explain(["explain", ct_path, "--model", cube_checkpoint, "--roi-mask", mask_path, "--out", out])
    ct, mask = load_volume(ct_path), load_volume(mask_path)
    inputs = model_inputs(tiny_model(**CUBE), ct, roi_mask=mask)
    _check_overlays(out, ct_path, inputs, 2 * 9)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["view"] for r in rows] == ["3d", "mean"] * len(inputs.centers_mm)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"]["mode"] == "roi" and len(summary["results"]["nodules"]) == len(inputs.centers_mm)
    report = (out / "report.html").read_text()
    assert "coronal" in report and "sagittal" in report


def test_whole_volume_model_explains_and_predicts(phantom, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "whole", seed=4, image_size=(16, 32, 32), patch=8, mode="volume", crop_body=True)
    ct = find_studies(phantom)[1].path
    out = tmp_path / "out"
    result = _explain(["explain", ct, "--model", ckpt, "--out", out, "--method", "cdam", "--method", "rollout"])
    assert re.search(r"the whole volume explained \(malignancy p = [01]\.\d{3}\)", result.output), result.output
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 1 and rows[0]["volume"] == "0"
    overlay = nib.load(str(next(out.glob("*_cdam_malignancy.nii.gz"))))
    assert overlay.shape == nib.load(str(ct)).shape
    predicted = CliRunner().invoke(cli, ["predict", str(ct), "--model", str(ckpt), "--device", "cpu", "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout)["summary"]["mode"] == "volume"
    assert "volume/s" in predicted.stderr  # the progress bar counts whole volumes


def test_batch_with_a_volumetric_roi_model(phantom, cube_checkpoint, tmp_path):
    studies = find_studies(phantom)[:2]
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "study_id,path,nodule_mask\n" + "".join(f"s{i},{s.path},{s.nodule_mask}\n" for i, s in enumerate(studies))
    )
    args = ["batch", manifest, "--out", tmp_path / "b", "--model", cube_checkpoint, "--roi-from-mask"]
    _explain([*args, "--method", "cdam", "--target", "malignancy", "--no-report", "--no-audit"])
    for i in range(2):
        assert (tmp_path / "b" / f"s{i}" / "predictions.csv").is_file()


def test_volumetric_roi_training_resumes_exactly_and_scores_nodules(phantom, tmp_path):
    config = tiny_config(image_size=(16, 16, 16), patch=8, mode="roi")
    config["training"] = {
        "seed": 2,
        "batch_size": 4,
        "val_fraction": 0.34,
        "token_label_weight": 1.0,
        "roi_jitter_mm": 2.0,
    }
    assert_resume_is_exact(config, phantom, tmp_path)
    model = tiny_model(**CUBE)
    rois = load_rois(find_studies(phantom), model, progress=False)
    assert rois.views == ("3d",) and len(rois) == rois.n_nodules
    # an un-jittered item is exactly what explain feeds the model for that nodule
    study = find_studies(phantom)[0]
    centres = nodule_centres(read_nodules(study), load_volume(study.nodule_mask))  # as training reads them
    inputs = model_inputs(model, load_volume(study.path), roi_centers=centres)
    np.testing.assert_array_equal(rois.images[: inputs.n_items].numpy(), inputs.images().numpy())
    recipe = tmp_path / "recipe.yaml"
    config["training"]["epochs"] = 1
    recipe.write_text(yaml.safe_dump(config))
    args = ["train", "--config", recipe, "--data", phantom, "--out", tmp_path / "ckpt", "--device", "cpu"]
    _explain(args)
    provenance = json.loads((tmp_path / "ckpt" / "config.json").read_text())["provenance"]
    assert provenance["n_train_views"] == provenance["n_train_nodules"]


def test_the_shipped_sample_roi3d_explains_the_sample_ct(tmp_path):
    """``explain CT --model sample-roi3d --roi-mask nodules``: overlays on the CT's grid, zero outside the
    cubes; the report shows three planes through each nodule."""
    from medvit_explain.model import load_model

    data = Path(__file__).resolve().parents[1] / "sample_data"
    ct, mask = data / "phantom_001.nii.gz", data / "phantom_001_nodules.nii.gz"
    out = tmp_path / "out"
    args = ["explain", ct, "--model", "sample-roi3d", "--roi-mask", mask, "--out", out, "--method", "cdam"]
    _explain([*args, "--target", "malignancy", "--target", "spiculation"])
    model = load_model("sample-roi3d", device="cpu")
    assert model.spatial_dims == 3 and model.grid_size == (8, 8, 8)
    inputs = model_inputs(model, load_volume(ct), roi_mask=load_volume(mask))
    _check_overlays(out, ct, inputs, 2)
    report = (out / "report.html").read_text()
    for plane in ("axial", "coronal", "sagittal"):  # one figure heading per plane and nodule
        headings = re.findall(rf'<h4 class="plane">[^<]*{plane} plane through its centre', report)
        assert len(headings) == len(inputs.centers_mm)
