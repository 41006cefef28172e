"""Bad images through the CLI: every case in ``images.CASES`` is refused by ``inspect``, ``explain`` and
``predict`` with one ``error:`` line, exit code 2 and nothing written; then the inputs that must load
(gantry tilt, links in a series folder, nested series, allowed modality) and the loader's own promises."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medvit_explain.errors import MedvitWarning, UnreadableImageError
from medvit_explain.io import dicom_folder, find_dicom_series, load_volume
from medvit_explain.io.quiet import native_stderr
from medvit_explain.volume import Volume

from .files import dicom_series, tiny_ct
from .harness import assert_clean, assert_refused, run_cli
from .images import CASES, jpeg_ls_available, tilted_series


def _command(command: str, path, tmp_path) -> tuple[list, tuple]:
    """The CLI arguments for ``command`` on ``path`` and the outputs that must not appear."""
    if command == "explain":
        out = tmp_path / "out"
        return ["explain", path, "--out", out, "--method", "cdam", "--no-report"], (out,)
    if command == "predict":
        out = tmp_path / "out.csv"
        return ["predict", path, "--out", out], (out,)
    return ["inspect", path], ()


@pytest.mark.parametrize("command", ["inspect", "explain", "predict"])
@pytest.mark.parametrize("name", list(CASES))
def test_bad_image_refused_in_one_line(tmp_path, name, command):
    case = CASES[name](_folder(tmp_path / "in"))
    args, absent = _command(command, case.path, tmp_path)
    assert_refused(run_cli(args), match=case.match, absent=absent)


def _folder(path):
    path.mkdir()
    return path


# ---------------------------------------------------------------------------------------- gantry tilt


def _marker_ct(index=(20, 18, 4)) -> Volume:
    """Air with one bright voxel at ``index``: its intensity centroid marks one physical point."""
    volume = tiny_ct()
    array = np.full(volume.shape, -1000.0, np.float32)
    array[index] = 1000.0
    return volume.with_array(array)


def _centroid(volume: Volume) -> np.ndarray:
    weights = volume.array - volume.array.min()
    ijk = np.argwhere(weights > 0)
    return volume.index_to_physical((ijk * weights[weights > 0][:, None]).sum(0) / weights.sum())


def test_tilted_series_resampled_so_a_marker_keeps_its_physical_point(tmp_path):
    index = (20, 18, 4)
    source = _marker_ct(index)
    tilted_series(tmp_path / "tilt", volume=source)
    dy = np.tan(np.radians(15.0)) * source.spacing[2]
    truth = source.index_to_physical(index) + np.array([0.0, index[2] * dy, 0.0])  # where the voxel really is
    with pytest.warns(MedvitWarning, match="gantry tilt 15.0° corrected"):
        loaded = load_volume(tmp_path / "tilt")
    np.testing.assert_allclose(_centroid(loaded), truth, atol=1e-3)
    assert loaded.array.max() > 0  # the marker survived interpolation
    np.testing.assert_allclose(loaded.spacing, source.spacing, atol=1e-6)  # plane distance, not step length
    np.testing.assert_allclose(loaded.direction, np.eye(3), atol=1e-9)
    assert loaded.shape == (40, 36 + 2, 5)  # grown in y to hold the 3.2 mm drift
    assert loaded.metadata["resampled"] == "gantry tilt 15.0° corrected: resampled onto an orthogonal grid"
    assert len(loaded.metadata["dicom_instances"]) == len(loaded.metadata["dicom_files"]) == 5
    rounded = np.round(loaded.physical_to_index(truth)).astype(int)
    assert loaded.array[tuple(rounded)] > 0  # physical_to_index finds it too


def test_tilted_series_cli_prints_one_warning(tmp_path):
    tilted_series(tmp_path / "tilt")
    outcome = run_cli(["inspect", tmp_path / "tilt"])
    assert_clean(outcome, warnings_allowed=1)
    assert len(outcome.warnings) == 1 and "gantry tilt 15.0° corrected" in outcome.warnings[0]


def test_untilted_series_is_untouched(tmp_path):
    files = dicom_series(tmp_path / "s", _marker_ct())
    reader_ = sitk.ImageSeriesReader()
    reader_.SetFileNames([str(f) for f in files])
    direct = reader_.Execute()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedvitWarning)
        loaded = load_volume(tmp_path / "s")
    np.testing.assert_array_equal(loaded.array, sitk.GetArrayFromImage(direct).transpose(2, 1, 0).astype(np.float32))
    assert tuple(loaded.origin) == direct.GetOrigin() and tuple(loaded.spacing) == direct.GetSpacing()
    assert tuple(loaded.direction.ravel()) == direct.GetDirection() and "resampled" not in loaded.metadata


# ---------------------------------------------------------------------------------------- finding series


def test_links_in_a_series_folder_count_once(tmp_path):
    volume = tiny_ct()
    files = dicom_series(tmp_path / "s", volume)
    os.symlink(".", tmp_path / "s" / "self")
    os.symlink(files[0].name, tmp_path / "s" / "again.dcm")
    assert [len(s.files) for s in find_dicom_series(tmp_path / "s")] == [5]
    np.testing.assert_array_equal(load_volume(tmp_path / "s").array, volume.array)
    assert_clean(run_cli(["inspect", tmp_path / "s"]))


def test_series_in_sub_folders_and_split_over_two(tmp_path):
    volume = tiny_ct()
    deep = tmp_path / "patient" / "study" / "series"
    files = dicom_series(deep, volume)
    np.testing.assert_array_equal(load_volume(tmp_path / "patient").array, volume.array)
    for k, path in enumerate(files):  # odd slices in one folder, even ones in another
        (deep / "ab"[k % 2]).mkdir(exist_ok=True)
        shutil.move(path, deep / "ab"[k % 2] / path.name)
    loaded = load_volume(tmp_path / "patient")
    np.testing.assert_array_equal(loaded.array, volume.array)
    np.testing.assert_allclose(loaded.origin, volume.origin, atol=1e-6)


def test_search_stops_after_its_limit(tmp_path, monkeypatch):
    dicom_series(tmp_path / "s")
    monkeypatch.setattr(dicom_folder, "DICOM_SEARCH_LIMIT", 3)
    assert_refused(run_cli(["inspect", tmp_path / "s"]), match=r"more than 3 files.*pass the folder of one series")


# ---------------------------------------------------------------------------------------- what may be allowed


def test_external_data_file_allowed_from_python(tmp_path):
    case = CASES["mhd_data_file_above"](_folder(tmp_path / "in"))
    loaded = load_volume(case.path, allow_external_data=True)
    np.testing.assert_array_equal(loaded.array.transpose(2, 1, 0).ravel(), np.arange(32))


def test_no_modality_allowed_with_one_warning(tmp_path):
    case = CASES["no_modality_series"](_folder(tmp_path / "in"))
    with pytest.warns(MedvitWarning, match="has no Modality attribute"):
        assert load_volume(case.path, allow_modality=True).modality == "unknown"
    outcome = run_cli(["inspect", case.path, "--allow-modality", "--json"])
    assert_clean(outcome, warnings_allowed=1)
    assert len(outcome.warnings) == 1 and json.loads(outcome.stdout)["modality"] == "unknown"


def test_secondary_capture_allowed_reads_its_pixels(tmp_path):
    case = CASES["secondary_capture_without_modality"](_folder(tmp_path / "in"))
    if jpeg_ls_available():
        assert pydicom.dcmread(case.path).file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    with pytest.warns(MedvitWarning):
        loaded = load_volume(case.path, allow_modality=True)
    np.testing.assert_array_equal(loaded.array[:, :, 0], tiny_ct().array[:, :, 2])


def test_inspect_lists_series_without_control_characters(tmp_path):
    case = CASES["several_series_with_escapes"](_folder(tmp_path / "in"))
    series = find_dicom_series(case.path)
    assert all("\x1b" not in s.describe() and "\x07" not in s.describe() for s in series)
    outcome = run_cli(["inspect", case.path, "--series", series[0].uid])
    assert_clean(outcome)
    assert "RED" in outcome.stdout or "title" in outcome.stdout
    assert not any(c in outcome.stdout for c in "\x1b\x07")


# ---------------------------------------------------------------------------------------- loader promises


@pytest.mark.parametrize("name", ["ct.nii", "ct.nii.gz"])
def test_negative_qfac_is_geometry_not_an_error(tmp_path, name):
    """A NIfTI with a left-handed affine stores qfac = -1 and positive pixdims: read as nibabel reads it."""
    affine = np.array([[-2.0, 0, 0, 10], [0, 2.0, 0, -20], [0, 0, 3.0, 30], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4), affine), str(tmp_path / name))
    assert nib.load(str(tmp_path / name)).header["pixdim"][0] == -1
    np.testing.assert_allclose(load_volume(tmp_path / name).affine_ras, affine, atol=1e-5)


def test_native_chatter_goes_into_the_error_not_the_terminal(tmp_path, capfd):
    case = CASES["mha_cut_short"](_folder(tmp_path / "in"))
    before = os.fstat(2)
    with pytest.raises(UnreadableImageError, match="data not read completely"):
        load_volume(case.path)
    after = os.fstat(2)
    assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
    assert capfd.readouterr().err == ""


def test_native_stderr_restores_fd_2_after_an_exception(capfd):
    before = os.fstat(2)
    with pytest.raises(RuntimeError), native_stderr() as native:
        os.write(2, b"chatter\n")
        raise RuntimeError("boom")
    assert native.lines == ["chatter"] and os.fstat(2).st_ino == before.st_ino
    os.write(2, b"visible\n")
    assert capfd.readouterr().err == "visible\n"
