"""The chain as MONAI transforms: a user's own Compose (load → … → ExplainViTd → Invertd → SaveImaged) writes
the overlays ``medvit-explain explain`` writes, on an oblique anisotropic NIfTI and a DICOM series."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medvit_explain.cli import cli
from medvit_explain.io import load_volume, write_volume
from medvit_explain.io.dicom_series import write_ct_series
from medvit_explain.model import build_model, save_checkpoint
from medvit_explain.transforms import SliceInputs

from .conftest import rotation
from .models import tiny_config
from .test_pipeline import body_volume

monai_transforms = pytest.importorskip("medvit_explain.monai_transforms")
from monai.transforms import Compose, Invertd, SaveImaged  # noqa: E402

METHODS = ["cdam", "agcam"]
TARGETS = ["malignancy", "spiculation"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config(image_size=(32, 48), patch=8, crop_body=True)
    config["architecture"]["kwargs"]["in_chans"] = 3
    config["preprocessing"].update(
        in_chans=3,
        channels={"recipe": "hu_windows", "windows": [[-1000, 400], [-160, 240], [-1400, -200]]},
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
    )
    return save_checkpoint(build_model(config), tmp_path_factory.mktemp("ckpt") / "tiny3")


def ct_with_body(direction, spacing, shape=(30, 26, 9)):
    volume = body_volume(direction, spacing, shape=shape)
    volume.array[:4] = -1000.0  # air around the body, so the body crop cuts something
    volume.array[:, -3:] = -1000.0
    return volume


def run_compose(path, model, out_dir):
    pre = Compose(monai_transforms.model_chain(model.preprocessing))
    explain = monai_transforms.ExplainViTd("image", model, METHODS, TARGETS, batch_size=4)
    post = Compose(
        [Invertd(explain.map_keys, pre, orig_keys="image")]
        + [
            SaveImaged(
                k,
                output_dir=str(out_dir),
                output_postfix=k,
                separate_folder=False,
                resample=False,
                output_dtype=np.float32,
                print_log=False,
            )
            for k in explain.map_keys
        ]
    )
    return post(explain(pre({"image": str(path)})))


def explain_cli(path, checkpoint, out_dir):
    args = ["explain", path, "--model", checkpoint, "--out", out_dir, "--map-dtype", "float32", "--no-report"]
    for m in METHODS:
        args += ["--method", m]
    for t in TARGETS:
        args += ["--target", t]
    done = CliRunner().invoke(cli, [str(a) for a in [*args, "--device", "cpu"]])
    assert done.exit_code == 0, done.output


@pytest.mark.parametrize("kind", ["oblique_nifti", "dicom_series"])
def test_compose_writes_the_overlays_explain_writes(kind, checkpoint, tmp_path):
    from medvit_explain.model import load_model

    if kind == "oblique_nifti":
        path = write_volume(ct_with_body(rotation(0.3, -0.2, 0.5), (0.7, 0.9, 1.5)), tmp_path / "ct.nii.gz")
        stem = "ct"
    else:
        path = tmp_path / "series"
        write_ct_series(ct_with_body(np.eye(3), (0.9, 0.8, 3.0)), path)
        stem = "series"
    model = load_model(checkpoint, device="cpu")
    run_compose(path, model, tmp_path / "monai")
    explain_cli(path, checkpoint, tmp_path / "cli")
    source = load_volume(str(path))
    for m in METHODS:
        for t in TARGETS:
            mine = nib.load(str(tmp_path / "monai" / f"{stem}_{m}_{t}.nii.gz"))
            theirs = nib.load(str(tmp_path / "cli" / f"{stem}_{m}_{t}.nii.gz"))
            a, b = np.asarray(mine.dataobj, np.float32), np.asarray(theirs.dataobj, np.float32)
            assert a.shape == b.shape == tuple(source.shape)
            scale = float(np.abs(b).max())
            assert scale > 0 and float(np.abs(a - b).max()) <= 1e-5 * scale, (m, t, float(np.abs(a - b).max()), scale)
            np.testing.assert_allclose(mine.affine, theirs.affine, atol=1e-4)


def test_chain_inputs_equal_the_streamed_inputs(checkpoint, tmp_path):
    """The model inputs the MONAI chain makes are the ones ``explain`` streams (3 HU windows, ImageNet
    mean/std, body crop, non-square input), on a flipped anisotropic volume."""
    from medvit_explain.model import load_model

    volume = ct_with_body(np.diag([-1.0, 1.0, -1.0]), (0.8, 0.6, 2.0))
    path = write_volume(volume, tmp_path / "flipped.nii.gz")
    model = load_model(checkpoint, device="cpu")
    data = Compose(monai_transforms.model_chain(model.preprocessing))({"image": str(path)})
    chain = data["image"].as_tensor().permute(3, 0, 2, 1)  # [Z, C, H, W]
    streamed = SliceInputs(load_volume(str(path)), model.preprocessing)
    want = streamed.images(np.arange(streamed.n_items))
    assert chain.shape == want.shape == (9, 3, 32, 48)
    torch.testing.assert_close(chain, want, rtol=0, atol=1e-6)


def test_roi_models_are_refused_with_a_pointer():
    from medvit_explain.errors import MedvitInputError

    with pytest.raises(MedvitInputError, match="slice-mode models; explain an ROI model with explain_volume"):
        monai_transforms.model_chain({"mode": "roi", "image_size": [32, 32], "in_chans": 1})


def test_load_keeps_the_readers_checks_and_geometry(tmp_path):
    """LoadCTd reads with the package's readers: a non-CT series is refused (the reader's one-line error is
    the cause MONAI's Compose wraps), allowed with allow_modality; the MetaTensor carries the RAS affine."""
    import pydicom

    from medvit_explain.errors import ModalityError

    volume = ct_with_body(np.eye(3), (0.9, 0.8, 3.0))
    write_ct_series(volume, tmp_path / "mr")
    for path in sorted((tmp_path / "mr").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(path)
    with pytest.raises(RuntimeError) as info:
        Compose([monai_transforms.LoadCTd("image")])({"image": str(tmp_path / "mr")})
    assert isinstance(info.value.__cause__, ModalityError) and "allow-modality" in str(info.value.__cause__)
    with pytest.warns(UserWarning, match="not CT"):
        data = Compose([monai_transforms.LoadCTd("image", allow_modality=True)])({"image": str(tmp_path / "mr")})
    image = data["image"]
    assert tuple(image.shape) == (1, *volume.shape)
    np.testing.assert_allclose(
        np.asarray(image.affine), load_volume(str(tmp_path / "mr"), allow_modality=True).affine_ras, atol=1e-4
    )
    assert image.meta["modality"] == "MR" and image.meta["format"] == "dicom-series"
