"""export-bundle: a MONAI bundle whose metadata verifies and whose ``monai.bundle run`` writes the overlays
``medvit-explain explain --map-dtype float32`` writes (tiny slice-mode model, small oblique CT)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medvit_explain.cli import cli
from medvit_explain.io import write_volume
from medvit_explain.volume import Volume

from .conftest import rotation
from .models import tiny_checkpoint

monai_bundle = pytest.importorskip("monai.bundle")
pytest.importorskip("jsonschema")  # verify_metadata validates with it

HAS_FIRE = importlib.util.find_spec("fire") is not None  # python -m monai.bundle parses its flags with fire
NO_FIRE = "python -m monai.bundle needs the fire package (not installed)"
CDAM = "Class-Discriminative Attention Maps for Vision Transformers"
AGCAM = "Attention Guided CAM"


def ct_with_body(shape=(30, 26, 9)):
    """Random HU with air around a body, so the body crop cuts something; oblique, anisotropic voxels."""
    array = np.random.default_rng(0).integers(-1000, 400, size=shape).astype(np.float32)
    array[:4], array[:, -3:] = -1000.0, -1000.0
    return Volume(array, (-30.0, 12.5, 7.0), (0.7, 0.9, 1.5), rotation(0.3, -0.2, 0.5), {"path": "synthetic"})


def export(checkpoint, out):
    return CliRunner().invoke(cli, ["export-bundle", "--model", str(checkpoint), "--out", str(out)])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle exported from a tiny non-square, body-cropping model, then moved: it must not depend on
    where it was written."""
    root = tmp_path_factory.mktemp("bundle")
    checkpoint = tiny_checkpoint(root / "ckpt", image_size=(32, 48), patch=8, crop_body=True)
    done = export(checkpoint, root / "exported")
    assert done.exit_code == 0, done.output
    (root / "moved").mkdir()
    return (root / "exported").rename(root / "moved" / "B")


def test_export_writes_the_bundle_files_from_the_model(bundle):
    from medvit_explain.bundle import SCHEMA_PATH
    from medvit_explain.model import load_model
    from medvit_explain.monai_transforms import model_chain

    for name in ("configs/metadata.json", "configs/inference.json", "models/model/model.safetensors"):
        assert (bundle / name).is_file(), name
    for name in ("models/model/config.json", "docs/README.md", "docs/metadata_schema.json", "docs/license.txt"):
        assert (bundle / name).is_file(), name
    assert not list(bundle.rglob("*.pt"))  # no pickle
    assert sorted(p.name for p in bundle.parent.parent.iterdir()) == ["ckpt", "moved"]  # no temporary folder
    assert (bundle / "docs/metadata_schema.json").read_bytes() == SCHEMA_PATH.read_bytes()

    model = load_model(bundle / "models/model", device="cpu")
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    assert (image["num_channels"], image["spatial_shape"], image["value_range"]) == (1, [32, 48], [0.0, 1.0])
    assert (image["format"], image["modality"], image["dtype"]) == ("hounsfield", "CT", "float32")
    assert pred["num_channels"] == len(model.targets) == len(pred["channel_def"]) == 9
    assert [pred["channel_def"][str(k)].split(":")[0] for k in range(9)] == model.targets
    assert any(CDAM in r for r in meta["references"]) and any(AGCAM in r for r in meta["references"])
    assert meta["required_packages_version"]["medvit-explain"] and meta["monai_version"]

    config = json.loads((bundle / "configs/inference.json").read_text())
    assert config["model_preprocessing"] == json.loads(json.dumps(model.preprocessing))
    steps = [t["_target_"].rsplit(".", 1)[1] for t in config["preprocessing"]["transforms"]]
    assert steps == [type(t).__name__ for t in model_chain(model.preprocessing)]
    readme = (bundle / "docs/README.md").read_text()
    assert "model.pt" in readme and "safetensors" in readme and "not the official schema file" in readme


def test_metadata_verifies_against_the_shipped_schema_and_a_missing_key_fails(bundle, tmp_path):
    meta_file, schema = bundle / "configs/metadata.json", bundle / "docs/metadata_schema.json"
    monai_bundle.verify_metadata(meta_file=str(meta_file), filepath=str(schema))  # the file exists: no download
    meta = json.loads(meta_file.read_text())
    broken = [({k: v for k, v in meta.items() if k != key}, key) for key in ("task", "network_data_format")]
    tensor = json.loads(json.dumps(meta))
    del tensor["network_data_format"]["outputs"]["pred"]["channel_def"]
    broken.append((tensor, "channel_def"))
    for data, key in broken:
        path = tmp_path / f"no_{key}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=key):
            monai_bundle.verify_metadata(meta_file=str(path), filepath=str(schema))


@pytest.mark.skipif(not HAS_FIRE, reason=NO_FIRE)
def test_verify_metadata_command(bundle, tmp_path):
    args = ["verify_metadata", "--meta_file", "B/configs/metadata.json", "--filepath", "B/docs/metadata_schema.json"]
    done = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=bundle.parent, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_network_data_format_matches_the_network(bundle):
    monai_bundle.verify_net_in_out(
        net_id="model",
        meta_file=str(bundle / "configs/metadata.json"),
        config_file=str(bundle / "configs/inference.json"),
        device="cpu",
        bundle_root=str(bundle),  # no ConfigWorkflow here to say where the bundle is
    )


def test_bundle_run_writes_the_overlays_explain_writes(bundle, tmp_path):
    ct = write_volume(ct_with_body(), tmp_path / "ct.nii.gz")
    flags = ["--config_file", str(bundle / "configs/inference.json"), "--input", str(ct), "--output_dir", "OUT"]
    if torch.cuda.is_available():
        flags += ["--device", "cpu"]  # compared with explain on the CPU (else the config's default is the CPU)
    if HAS_FIRE:
        command = [sys.executable, "-m", "monai.bundle", "run", *flags]
    else:  # the function the command calls, with the same arguments
        keys = [f.removeprefix("--") for f in flags[::2]]
        call = f"run(**dict(zip({keys!r}, sys.argv[1:])))"
        command = [sys.executable, "-c", f"import sys; from monai.bundle import run; {call}", *flags[1::2]]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    args = ["explain", str(ct), "--model", str(bundle / "models/model"), "--out", str(tmp_path / "cli")]
    done = CliRunner().invoke(cli, [*args, "--map-dtype", "float32", "--no-report", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    written = sorted(p.name for p in (tmp_path / "OUT").iterdir())
    assert len(written) == 2 * 9 and written == sorted(p.name for p in (tmp_path / "cli").glob("ct_*_*.nii.gz"))
    for name in written:
        mine, theirs = nib.load(str(tmp_path / "OUT" / name)), nib.load(str(tmp_path / "cli" / name))
        a, b = np.asarray(mine.dataobj), np.asarray(theirs.dataobj)
        assert a.dtype == np.float32 and a.shape == b.shape == (30, 26, 9)
        scale = float(np.abs(b).max())
        assert scale > 0 and float(np.abs(a - b).max()) <= 1e-5 * scale, (name, float(np.abs(a - b).max()), scale)
        np.testing.assert_allclose(mine.affine, theirs.affine, atol=1e-4)


def test_run_needs_an_input_and_a_workflow(bundle):
    from monai.bundle import ConfigParser

    with pytest.raises(RuntimeError) as caught:
        monai_bundle.run(config_file=str(bundle / "configs/inference.json"), logging_file=False)
    assert "expected --input CT" in str(caught.value.__cause__ or caught.value)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    with pytest.raises(RuntimeError) as caught:
        parser.get_parsed_content("bundle_root")
    assert "set bundle_root to the bundle folder" in str(caught.value.__cause__)


def test_export_replaces_its_own_bundle_and_refuses_other_folders(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    done = export(checkpoint, foreign)
    assert done.exit_code == 2 and "refusing to overwrite" in done.output, done.output
    assert len(done.output.strip().splitlines()) == 1 and (foreign / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes"]  # no temporary folder left

    out = tmp_path / "B"
    assert export(checkpoint, out).exit_code == 0
    (out / "docs" / "stale.txt").write_text("old")
    assert export(checkpoint, out).exit_code == 0  # a previous bundle is replaced
    assert not (out / "docs" / "stale.txt").exists()
    (out / "output").mkdir()
    done = export(checkpoint, out)
    assert done.exit_code == 2 and "also holds output" in done.output, done.output
    shutil.rmtree(out / "output")
