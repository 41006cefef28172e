"""Reading volumes: exact geometry round trips and one-line errors for bad input."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from medvit_explain.cli import cli
from medvit_explain.errors import MedvitInputError, UnreadableImageError, UnsupportedImageError
from medvit_explain.io import load_volume, write_volume
from medvit_explain.volume import Volume

from .conftest import GEOMETRIES


def random_ct(rng, shape=(9, 7, 5)):
    return rng.integers(-1000, 1500, size=shape).astype(np.float32)


def sitk_image(array_xyz, origin, spacing, direction):
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple(np.asarray(direction).reshape(-1)))
    return image


def assert_geometry(volume, origin, spacing, direction, array, atol=1e-5):
    np.testing.assert_allclose(volume.origin, origin, atol=atol)
    np.testing.assert_allclose(volume.spacing, spacing, atol=atol)
    np.testing.assert_allclose(volume.direction, direction, atol=atol)
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, array)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_sitk_written_round_trip(tmp_path, rng, suffix, name, direction, spacing):
    array = random_ct(rng)
    origin = (-120.5, 33.25, -7.0)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk_image(array.astype(np.int16), origin, spacing, direction), str(path))
    volume = load_volume(path)
    assert volume.shape == array.shape
    assert_geometry(volume, origin, spacing, direction, array)


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_nibabel_ras_round_trip(tmp_path, rng, name, direction, spacing):
    """A NIfTI written by nibabel in RAS reads back as the same physical grid in LPS."""
    array = random_ct(rng)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.asarray(spacing)[None, :]
    affine_lps[:3, 3] = (10.0, -20.0, 30.5)
    affine_ras = np.diag([-1.0, -1, 1, 1]) @ affine_lps
    path = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(array.astype(np.int16), affine_ras), str(path))
    volume = load_volume(path)
    np.testing.assert_allclose(volume.affine_ras, affine_ras, atol=1e-4)
    assert_geometry(volume, affine_lps[:3, 3], spacing, direction, array, atol=1e-4)
    # The same voxel lands at the same world point in both conventions.
    ijk = np.array([3, 2, 4])
    world_ras = (affine_ras @ np.append(ijk, 1))[:3]
    np.testing.assert_allclose(np.diag([-1, -1, 1]) @ volume.index_to_physical(ijk), world_ras, atol=1e-4)


def test_nifti_scale_slope_applied(tmp_path):
    stored = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    img = nib.Nifti1Image(stored, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    np.testing.assert_array_equal(load_volume(path).array, stored * 2.0 - 1024.0)


def test_write_volume_round_trip(tmp_path, rng):
    from .conftest import rotation

    volume = Volume(random_ct(rng), (1.0, 2.0, 3.0), (0.5, 0.7, 2.5), rotation(0.1, 0.2, 0.3))
    path = write_volume(volume, tmp_path / "out.nii.gz")
    back = load_volume(path)
    assert back.same_grid(volume, atol=1e-5)
    np.testing.assert_array_equal(back.array, volume.array)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
    from medvit_explain.io.writer import usual_mode

    assert path.stat().st_mode & 0o777 == usual_mode()  # not mkstemp's private 0600


def test_index_physical_inverse(rng):
    from .conftest import rotation

    volume = Volume(np.zeros((4, 5, 6), np.float32), (3, -4, 5), (0.7, 0.8, 2.0), rotation(0.4, 0.1, -0.3))
    ijk = rng.uniform(0, 5, size=(10, 3))
    np.testing.assert_allclose(volume.physical_to_index(volume.index_to_physical(ijk)), ijk, atol=1e-9)
    np.testing.assert_allclose(volume.affine_lps @ np.append(ijk[0], 1), np.append(volume.index_to_physical(ijk[0]), 1))


def test_inspect_json_keys(tmp_path, rng):
    array = random_ct(rng)
    path = tmp_path / "ct.nii.gz"
    direction = np.diag([-1.0, 1.0, 1.0])
    sitk.WriteImage(sitk_image(array.astype(np.int16), (1, 2, 3), (0.5, 0.6, 2.0), direction), str(path))
    result = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert set(info) == {"shape", "spacing", "origin", "direction", "modality", "hu_min", "hu_max"}
    assert info["shape"] == [9, 7, 5]
    assert info["direction"] == [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert info["hu_min"] == float(array.min()) and info["hu_max"] == float(array.max())
    assert info["modality"] == "CT"


# ---------------------------------------------------------------- bad input: one line, exit code 2


def _nifti(tmp_path, name, data, zooms=None, dtype=None):
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype or np.float32), np.eye(4))
    path = tmp_path / name
    nib.save(img, str(path))
    if zooms is not None:  # nibabel repairs zero pixdims on save, so patch the raw header (offset 80)
        assert name.endswith(".nii")
        raw = bytearray(path.read_bytes())
        raw[80:92] = np.asarray(zooms, dtype="<f4").tobytes()
        path.write_bytes(bytes(raw))
    return path


def bad_inputs(tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "does_not_exist.nii.gz"
    (tmp_path / "empty").mkdir()
    cases["empty folder"] = tmp_path / "empty"
    (tmp_path / "notes.txt").write_text("not an image\n")
    cases["not an image"] = tmp_path / "notes.txt"
    (tmp_path / "fake.nii.gz").write_bytes(b"hello, I am not a nifti")
    cases["fake nifti"] = tmp_path / "fake.nii.gz"
    good = _nifti(tmp_path, "good.nii.gz", np.random.default_rng(1).normal(size=(40, 40, 30)))
    raw = good.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases["truncated gzip"] = tmp_path / "truncated.nii.gz"
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 10)
    cases["malformed dicom"] = tmp_path / "bad.dcm"
    image2d = sitk.GetImageFromArray(np.zeros((8, 8), np.int16))
    sitk.WriteImage(image2d, str(tmp_path / "flat.nii.gz"))
    cases["2D"] = tmp_path / "flat.nii.gz"
    cases["4D"] = _nifti(tmp_path, "time.nii.gz", np.zeros((6, 6, 4, 3)))
    nan = np.zeros((6, 6, 4))
    nan[1, 2, 3] = np.nan
    cases["NaN"] = _nifti(tmp_path, "nan.nii.gz", nan)
    inf = np.zeros((6, 6, 4))
    inf[0, 0, 0] = np.inf
    cases["inf"] = _nifti(tmp_path, "inf.nii.gz", inf)
    cases["zero spacing"] = _nifti(tmp_path, "zero.nii", np.zeros((6, 6, 4)), zooms=(1.0, 0.0, 1.0))
    mha = tmp_path / "neg.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 6, 6), np.int16)), str(mha))
    text = mha.read_bytes().replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 1 -1 1")
    mha.write_bytes(text)
    cases["negative spacing"] = mha
    return cases


def test_bad_inputs_raise_typed_errors(tmp_path):
    for name, path in bad_inputs(tmp_path).items():
        with pytest.raises(MedvitInputError):
            load_volume(path)
            pytest.fail(f"{name} was accepted")


def test_bad_inputs_cli_one_line_exit_2(tmp_path):
    runner = CliRunner()
    for name, path in bad_inputs(tmp_path).items():
        result = runner.invoke(cli, ["inspect", str(path)])
        assert result.exit_code == 2, (name, result.output)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.output)
        assert "Traceback" not in result.output


def test_error_messages_say_what(tmp_path):
    cases = bad_inputs(tmp_path)
    with pytest.raises(UnsupportedImageError, match="NaN"):
        load_volume(cases["NaN"])
    with pytest.raises(UnsupportedImageError, match="3D"):
        load_volume(cases["4D"])
    with pytest.raises(UnreadableImageError, match="truncated"):
        load_volume(cases["truncated gzip"])


def test_truncated_gzip_detected_by_gzip_too(tmp_path):
    cases = bad_inputs(tmp_path)
    with pytest.raises((EOFError, OSError)):
        gzip.decompress(cases["truncated gzip"].read_bytes())
