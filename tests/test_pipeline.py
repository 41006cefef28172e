"""explain_volume and `medvit-explain explain`: overlays on the source grid, outputs, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from medvit_explain.cli import cli
from medvit_explain.io import load_volume, write_volume
from medvit_explain.io.dicom_series import write_ct_series
from medvit_explain.pipeline import explain_volume
from medvit_explain.volume import Volume

from .conftest import GEOMETRIES
from .models import tiny_checkpoint, tiny_model

WINDOW = (-1000.0, 400.0)


def body_volume(direction, spacing, shape=(20, 18, 6), seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 400, size=shape).astype(np.float32)
    return Volume(array, (-30.0, 12.5, 7.0), spacing, direction, {"path": "synthetic"})


def input_explainer(model, images, targets, **_):
    """A stand-in 'explainer' whose map is the model input itself (one copy per target)."""
    return images[:, :1].expand(-1, len(targets), -1, -1).clone()


def test_identity_explainer_reproduces_input_on_every_geometry():
    """No flip, transpose or shift: the written-back 'map' equals the windowed input voxel for voxel."""
    for _, direction, spacing in GEOMETRIES:
        volume = body_volume(direction, spacing)
        from medvit_explain.transforms import SliceInputs

        probe = SliceInputs(volume, {"image_size": [1, 1], "in_chans": 1, "hu_window": list(WINDOW)})
        rows, cols = probe.canonical.shape[1], probe.canonical.shape[0]
        model = tiny_model(image_size=(rows, cols), patch=2)
        result = explain_volume(
            model, volume, methods=[input_explainer], targets=["malignancy", "texture"], batch_size=4
        )
        expected = np.clip((volume.array - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)
        for t in range(2):
            target = ["malignancy", "texture"][t]
            np.testing.assert_allclose(result.map_array("input_explainer", target), expected, atol=1e-6)


def test_identity_explainer_with_resize_and_crop_keeps_structure():
    """With a body crop and resizing the map still lines up with the anatomy (high correlation)."""
    from medvit_explain.phantom import generate_phantom

    ph = generate_phantom(2, size=(96, 80, 8), spacing=(3.6, 4.2, 6.0), n_nodules=1)
    model = tiny_model(image_size=(48, 48), patch=8, crop_body=True)
    result = explain_volume(model, ph.ct, methods=[input_explainer], targets=[0])
    expected = np.clip((ph.ct.array - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)
    got = result.map_array("input_explainer", result.targets[0])
    body = got > 0
    r = np.corrcoef(got[body], expected[body])[0, 1]
    assert r > 0.9, r


def _sitk_geometry(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection()


def _assert_same_geometry(overlay_path, reference):
    size, origin, spacing, direction = _sitk_geometry(overlay_path)
    ref = sitk.ReadImage(str(reference)) if not os.path.isdir(reference) else _read_series(reference)
    assert size == ref.GetSize()
    np.testing.assert_allclose(origin, ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(spacing, ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(direction, ref.GetDirection(), atol=1e-5)


def _read_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_cli_overlays_share_the_source_grid(tmp_path, checkpoint, name, direction, spacing):
    path = write_volume(body_volume(direction, spacing), tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    result = _run(
        [
            "explain",
            path,
            "--model",
            checkpoint,
            "--method",
            "cdam",
            "--target",
            "malignancy",
            "--target",
            "spiculation",
            "--out",
            out,
            "--no-report",
            "--device",
            "cpu",
        ]
    )
    assert result.exit_code == 0, result.output
    for target in ("malignancy", "spiculation"):
        overlay = out / f"ct_cdam_{target}.nii.gz"
        _assert_same_geometry(overlay, path)
        assert sitk.ReadImage(str(overlay)).GetPixelID() == sitk.sitkFloat32
    rows = (out / "predictions.csv").read_text().splitlines()
    axial_axis = int(np.argmax(np.abs(np.asarray(direction)[2, :])))  # the source axis closest to S
    assert len(rows) == 1 + (20, 18, 6)[axial_axis] and rows[0].startswith(
        "slice,source_index,z_mm,malignancy_prob,malignancy_logit"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["cdam"] and summary["targets"] == ["malignancy", "spiculation"]
    assert len(summary["input"]["sha256"]) == 64 and len(summary["model"]["sha256"]) == 64
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_cli_ras_nifti_and_dicom_series(tmp_path, checkpoint):
    volume = body_volume(np.diag([-1.0, 1.0, 1.0]), (0.8, 0.7, 2.5))
    affine_ras = np.diag([-1.0, -1, 1, 1]) @ volume.affine_lps
    ras = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(volume.array.astype(np.int16), affine_ras), str(ras))
    out = tmp_path / "ras_out"
    assert (
        _run(
            ["explain", ras, "--model", checkpoint, "--method", "agcam", "--target", "0", "--out", out, "--no-report"]
        ).exit_code
        == 0
    )
    _assert_same_geometry(out / "ras_agcam_malignancy.nii.gz", ras)
    np.testing.assert_allclose(nib.load(str(out / "ras_agcam_malignancy.nii.gz")).affine, affine_ras, atol=1e-4)

    series = tmp_path / "series"
    write_ct_series(body_volume(np.eye(3), (0.9, 0.9, 3.0)), series)
    out = tmp_path / "dcm_out"
    result = _run(
        [
            "explain",
            series,
            "--model",
            checkpoint,
            "--method",
            "cdam",
            "--target",
            "texture",
            "--out",
            out,
            "--no-report",
        ]
    )
    assert result.exit_code == 0, result.output
    _assert_same_geometry(out / "series_cdam_texture.nii.gz", series)


def test_maps_are_raw_and_equal_to_the_explainer(checkpoint):
    """The written map is the explainer's raw signed map, bilinearly upsampled (not min-max'd)."""
    from medvit_explain.explainers import explain
    from medvit_explain.model import load_model

    model = load_model(checkpoint, device="cpu")
    volume = body_volume(np.eye(3), (1.0, 1.0, 2.0), shape=(32, 32, 3))
    result = explain_volume(model, volume, methods=["cdam"], targets=["malignancy"])
    images = result.inputs.images([1])
    raw = explain(model, images, "cdam", targets=["malignancy"])
    up = torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)
    on_grid = result.map_array("cdam", "malignancy")
    np.testing.assert_allclose(on_grid[:, :, 1], up[0, 0].numpy().T, rtol=1e-5, atol=1e-6)
    assert on_grid.min() < 0 < on_grid.max()


def test_roi_mode_writes_zero_outside(tmp_path, checkpoint):
    volume = body_volume(np.eye(3), (1.0, 1.0, 1.0), shape=(40, 40, 30))
    path = write_volume(volume, tmp_path / "ct.nii.gz")
    centres = tmp_path / "centres.csv"
    centres.write_text("x_mm,y_mm,z_mm\n" + ",".join(str(v) for v in volume.index_to_physical([20, 20, 15])) + "\n")
    out = tmp_path / "roi"
    result = _run(
        [
            "explain",
            path,
            "--model",
            checkpoint,
            "--method",
            "cdam",
            "--target",
            "malignancy",
            "--roi-centers",
            centres,
            "--out",
            out,
            "--no-report",
        ]
    )
    assert result.exit_code == 0, result.output
    overlay = load_volume(out / "ct_cdam_malignancy.nii.gz")
    nonzero = np.argwhere(overlay.array != 0)
    assert len(nonzero) > 0
    assert nonzero.min(axis=0).tolist() >= [20 - 9, 20 - 9, 15 - 9]
    assert nonzero.max(axis=0).tolist() <= [20 + 9, 20 + 9, 15 + 9]
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + 4  # three views and their mean
    assert "mean" in rows[-1]


BAD_ARGS = {
    "missing input": ["{tmp}/nope.nii.gz"],
    "unknown target": ["{ct}", "--target", "fluffiness"],
    "unknown method": ["{ct}", "--method", "magic"],
    "bad device": ["{ct}", "--device", "tpu"],
    "missing model": ["{ct}", "--model", "{tmp}/no_model"],
    "dicom for nifti": ["{ct}", "--dicom"],
    "bad roi file": ["{ct}", "--roi-centers", "{tmp}/notes.txt"],
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_cli_bad_input_one_line_exit_2_no_output(tmp_path, checkpoint, case):
    ct = write_volume(body_volume(np.eye(3), (1.0, 1.0, 2.0)), tmp_path / "ct.nii.gz")
    (tmp_path / "notes.txt").write_text("hello\n")
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path, ct=ct) for a in BAD_ARGS[case]]
    if "--model" not in args:
        args += ["--model", str(checkpoint)]
    result = _run(["explain", *args, "--out", out])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not out.exists()


def test_killed_run_leaves_no_truncated_file(tmp_path, checkpoint):
    """kill -9 at several moments: every file under a final name is complete; a re-run then succeeds."""
    from medvit_explain.phantom import generate_phantom

    ph = generate_phantom(4, size=(96, 96, 40), spacing=(3.6, 3.6, 4.0), n_nodules=1)
    ct = write_volume(ph.ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "medvit_explain",
        "explain",
        str(ct),
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--method",
        "cdam",
        "--method",
        "agcam",
    ]
    for delay in (2.5, 4.0, 5.5):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in out.glob("*.nii.gz") if out.exists() else []:
            if not path.name.startswith("."):  # a temporary name a killed writer could not remove
                assert load_volume(path).shape == ph.ct.shape
        if out.exists() and (out / "summary.json").exists():
            json.loads((out / "summary.json").read_text())
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(out.glob("ct_*.nii.gz"))) == 18
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the re-run removed the leftovers
    assert json.loads((out / "summary.json").read_text())["targets"][0] == "malignancy"
