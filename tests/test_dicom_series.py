"""CT DICOM series writer: geometry and voxels round-trip through SimpleITK and pydicom."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medvit_explain.errors import UnsupportedImageError
from medvit_explain.io.dicom_series import rescale_for, write_ct_file, write_ct_series
from medvit_explain.volume import Volume


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = (f(np.radians(a)) for a in (ax, ay, az) for f in (np.cos, np.sin))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _volume(direction=None, spacing=(0.7, 0.9, 2.5), origin=(12.5, -30.25, 101.0), shape=(20, 15, 7)):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1024, 3000, size=shape).astype(np.float32)
    return Volume(arr, origin, spacing, np.eye(3) if direction is None else direction)


def _read_series(folder):
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    reader.SetFileNames(names)
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # [Z, Y, X] -> [X, Y, Z]
    return img, arr, names


@pytest.mark.parametrize(
    "name, direction",
    [
        ("identity", np.eye(3)),
        ("oblique", _rotation(10, -20, 30)),
        ("flipped_xy", np.diag([-1.0, -1.0, 1.0])),
        ("permuted", np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])),  # sagittal-like
    ],
)
def test_series_roundtrip_sitk(tmp_path, name, direction):
    vol = _volume(direction)
    paths = write_ct_series(vol, tmp_path / name)
    assert len(paths) == vol.shape[2]
    img, arr, names = _read_series(tmp_path / name)
    assert len(names) == vol.shape[2]
    np.testing.assert_allclose(img.GetOrigin(), vol.origin, atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), vol.spacing, atol=1e-4)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), vol.direction, atol=1e-6)
    assert arr.shape == vol.shape
    np.testing.assert_array_equal(arr, vol.array)


def test_k_axis_against_normal_reads_back_reversed(tmp_path):
    """k = -cross(row, col): positions come from the real geometry; readers sort slices by position."""
    d = _rotation(5, 0, -15) @ np.diag([1.0, 1.0, -1.0])
    vol = _volume(d)
    write_ct_series(vol, tmp_path)
    img, arr, _ = _read_series(tmp_path)
    np.testing.assert_array_equal(arr, vol.array[:, :, ::-1])
    last = vol.index_to_physical(np.array([0.0, 0.0, vol.shape[2] - 1]))
    np.testing.assert_allclose(img.GetOrigin(), last, atol=1e-4)
    expected_dir = vol.direction.copy()
    expected_dir[:, 2] *= -1
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), expected_dir, atol=1e-6)


def test_pydicom_reads_every_file(tmp_path):
    vol = _volume(_rotation(0, 15, 0), spacing=(0.65, 0.8, 1.25))
    paths = write_ct_series(vol, tmp_path, series_description="test series", patient_id="P1")
    uids = set()
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "CT" and ds.PatientID == "P1" and ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (vol.shape[1], vol.shape[0])
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.PixelRepresentation == 1
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [0.8, 0.65])
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], vol.index_to_physical(np.array([0, 0, k])), atol=1e-6
        )
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, vol.array[:, :, k].T)  # DICOM [rows, cols] = [j, i]
        uids.add(ds.SOPInstanceUID)
        assert ds.StudyInstanceUID and ds.SeriesInstanceUID and ds.FrameOfReferenceUID
    assert len(uids) == len(paths)


def test_deterministic_uids_and_bytes(tmp_path):
    vol = _volume()
    a = write_ct_series(vol, tmp_path / "a", uid_seed=7)
    b = write_ct_series(vol, tmp_path / "b", uid_seed=7)
    c = write_ct_series(vol, tmp_path / "c", uid_seed=8)
    d = write_ct_series(vol, tmp_path / "d")  # content-derived UIDs
    e = write_ct_series(vol, tmp_path / "e")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in d] == [p.read_bytes() for p in e]
    assert pydicom.dcmread(a[0]).SeriesInstanceUID != pydicom.dcmread(c[0]).SeriesInstanceUID
    assert not list((tmp_path / "a").glob(".*"))  # no temporary files left behind


def test_explicit_uids(tmp_path):
    paths = write_ct_series(
        _volume(), tmp_path, study_uid="1.2.3", series_uid="1.2.3.4", frame_of_reference_uid="1.2.3.5"
    )
    ds = pydicom.dcmread(paths[0])
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID)
    assert uids == ("1.2.3", "1.2.3.4", "1.2.3.5")


def test_single_file(tmp_path):
    vol = _volume(_rotation(0, 0, 20))
    path = write_ct_file(vol, tmp_path / "one.dcm", k=3)
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    np.testing.assert_array_equal(arr[:, :, 0], vol.array[:, :, 3])
    np.testing.assert_allclose(img.GetOrigin(), vol.index_to_physical(np.array([0, 0, 3])), atol=1e-4)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3))[:, :2], vol.direction[:, :2], atol=1e-6)
    np.testing.assert_allclose(img.GetSpacing()[:2], vol.spacing[:2], atol=1e-6)
    with pytest.raises(ValueError, match="expected 0 <= k"):
        write_ct_file(vol, tmp_path / "bad.dcm", k=7)


def test_rescale_choice():
    assert rescale_for(np.array([-1024.0, 3071.0])) == (1.0, -1024.0)
    assert rescale_for(np.array([-32768.0, 32000.0])) == (1.0, 0.0)
    slope, intercept = rescale_for(np.array([-1e5, 1e5]))
    assert slope > 1
    stored = np.rint((np.array([-1e5, 1e5]) - intercept) / slope)
    assert stored.min() >= -32768 and stored.max() <= 32767


def test_non_integer_values_rounded(tmp_path):
    vol = _volume()
    vol.array[0, 0, 0] = 10.4
    write_ct_series(vol, tmp_path)
    _, arr, _ = _read_series(tmp_path)
    assert arr[0, 0, 0] == 10


def test_sheared_direction_refused(tmp_path):
    d = np.eye(3)
    d[:, 2] = [0.0, np.sin(0.2), np.cos(0.2)]
    with pytest.raises(UnsupportedImageError, match="orthonormal"):
        write_ct_series(_volume(d), tmp_path)
