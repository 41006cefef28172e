"""DICOM Parametric Map output: references the source CT, same study, new series, exact float maps."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from highdicom.pm.sop import pmread
from pydicom.uid import ParametricMapStorage

from medvit_explain.errors import MedvitInputError
from medvit_explain.io import load_volume
from medvit_explain.io.dicom_output import write_dicom_maps
from medvit_explain.io.dicom_series import write_ct_file, write_ct_series
from medvit_explain.model import build_model
from medvit_explain.outputs import write_outputs
from medvit_explain.pipeline import explain_volume
from medvit_explain.volume import Volume

from .conftest import rotation

TARGETS = ["malignancy", "subtlety"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(
        {
            "name": "tiny",
            "architecture": {
                "timm_name": "vit_tiny_patch16_224",
                "kwargs": dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2),
            },
            "task_spec": "lidc",
            "preprocessing": {"mode": "slice", "image_size": [32, 32], "hu_window": [-1000, 400]},
        }
    ).eval()


def _ct(direction) -> Volume:
    rng = np.random.default_rng(1)
    arr = np.rint(rng.normal(-700, 250, (40, 36, 5))).astype(np.float32)
    arr[14:26, 10:22, 1:4] = 60.0
    return Volume(arr, (12.5, -30.0, 101.0), (0.8, 0.7, 2.0), direction)


# flipped: the written k axis runs against the slice normal, so the reader returns the slices in the
# reverse order of the files' instance numbers; oblique: a rotated grid
@pytest.mark.parametrize(
    "direction", [np.diag([-1.0, 1.0, -1.0]), rotation(0.3, -0.2, 0.5)], ids=["flipped", "oblique"]
)
def test_parametric_maps_reference_source(model, tmp_path, direction):
    files = write_ct_series(_ct(direction), tmp_path / "ct", uid_seed=3)
    source = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f) for f in files)}
    study = next(iter(source.values())).StudyInstanceUID
    src_series = next(iter(source.values())).SeriesInstanceUID
    frame_of_ref = next(iter(source.values())).FrameOfReferenceUID
    volume = load_volume(tmp_path / "ct")
    assert volume.metadata["format"] == "dicom-series"
    result = explain_volume(model, volume, ["attention", "cdam"], TARGETS, batch_size=8)

    out = write_dicom_maps(result, tmp_path / "out", stem="ct", map_dtype="float32")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"ct_{m}_{t}_pm.dcm" for m in ("attention", "cdam") for t in TARGETS)

    series_uids = set()
    slice_pos = volume.index_to_physical(np.stack([np.zeros(5), np.zeros(5), np.arange(5.0)], axis=1))
    for method in ("attention", "cdam"):
        for target in TARGETS:
            ds = pydicom.dcmread(out / f"ct_{method}_{target}_pm.dcm")
            assert ds.SOPClassUID == ParametricMapStorage and ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
            assert ds.StudyInstanceUID == study and ds.FrameOfReferenceUID == frame_of_ref
            assert ds.SeriesInstanceUID != src_series
            series_uids.add(ds.SeriesInstanceUID)
            assert ds.SeriesDescription == {"cdam": "CDAM", "attention": "Attention"}[method] + f" {target}"
            assert ds.PatientID == next(iter(source.values())).PatientID
            # every source instance is referenced, nothing else
            refs = {
                item.ReferencedSOPInstanceUID
                for series in ds.ReferencedSeriesSequence
                for item in series.ReferencedInstanceSequence
            }
            assert refs == set(source)
            # real-world value mapping: identity, unitless, labelled with the method
            rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
            assert rwvm.LUTLabel == {"cdam": "CDAM", "attention": "Attention"}[method]
            assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "1"
            assert float(rwvm.RealWorldValueSlope) == 1.0 and float(rwvm.RealWorldValueIntercept) == 0.0
            # float pixel data, exactly the raw map; frame n ↔ slice k by the frame's plane position,
            # and the frame's source reference is the CT image at that position
            assert "FloatPixelData" in ds and ds.BitsAllocated == 32
            frames = ds.pixel_array
            assert frames.dtype == np.float32 and frames.shape == (5, 36, 40)
            seen = []
            for n, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
                pos = np.array(group.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
                k = int(np.argmin(np.linalg.norm(slice_pos - pos, axis=1)))
                assert np.allclose(slice_pos[k], pos, atol=1e-3)
                np.testing.assert_array_equal(frames[n], result.map_array(method, target)[:, :, k].T)
                ref = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                assert np.allclose(np.array(source[ref].ImagePositionPatient, dtype=np.float64), pos, atol=1e-3)
                seen.append(k)
            assert sorted(seen) == list(range(5))
            assert np.abs(frames).max() > 0
    assert len(series_uids) == 4  # one new series per method × target

    # highdicom reads it back as a Parametric Map
    pm = pmread(out / "ct_cdam_malignancy_pm.dcm")
    assert pm.ContentLabel == "CDAM_MALIGNANCY"
    # nothing left over from the atomic writes; a rerun gives the same UIDs (deterministic)
    uid_before = pydicom.dcmread(out / "ct_cdam_malignancy_pm.dcm").SOPInstanceUID
    write_dicom_maps(result, out, stem="ct", map_dtype="float32")
    assert sorted(p.name for p in out.iterdir()) == names
    assert pydicom.dcmread(out / "ct_cdam_malignancy_pm.dcm").SOPInstanceUID == uid_before


def test_non_dicom_input_refused(model, tmp_path):
    vol = _ct(np.eye(3))
    vol.metadata.update({"path": "/x/scan.nii.gz", "format": "nifti"})
    result = explain_volume(model, vol, ["attention"], ["malignancy"])
    with pytest.raises(MedvitInputError, match="--dicom needs a DICOM input"):
        write_dicom_maps(result, tmp_path / "out", stem="scan")
    assert not (tmp_path / "out").exists()


def test_unmatched_source_files_refused(model, tmp_path):
    """Source files that do not sit on the volume's slices give one clear error, no output."""
    files = write_ct_series(_ct(np.eye(3)), tmp_path / "ct", uid_seed=4)
    volume = load_volume(tmp_path / "ct")
    result = explain_volume(model, volume, ["attention"], ["malignancy"])
    result.volume.metadata["dicom_files"] = [str(f) for f in files[:-1]]
    with pytest.raises(MedvitInputError, match="one source DICOM image per slice"):
        write_dicom_maps(result, tmp_path / "out", stem="ct")
    result.volume.metadata["dicom_files"] = [str(files[0])] * 5
    with pytest.raises(MedvitInputError, match="no source DICOM image lies at slice"):
        write_dicom_maps(result, tmp_path / "out2", stem="ct")


def test_save_with_dicom_and_report(model, tmp_path):
    """``write_outputs(dicom=True)``: overlays, report and Parametric Maps side by side."""
    write_ct_series(_ct(np.eye(3)), tmp_path / "ct", uid_seed=5)
    result = explain_volume(model, load_volume(tmp_path / "ct"), ["attention"], ["malignancy"])
    written = write_outputs(result, tmp_path / "out", dicom=True, report=True)
    assert written["dicom"] == tmp_path / "out" / "dicom"
    assert [p.name for p in written["dicom"].iterdir()] == ["ct_attention_malignancy_pm.dcm"]
    assert written["report"].is_file() and "data:image/png;base64," in written["report"].read_text()


def test_single_dicom_file(model, tmp_path):
    """A single-image DICOM input: one frame referencing that image."""
    path = write_ct_file(_ct(np.eye(3)), tmp_path / "one.dcm", k=2, uid_seed=6)
    volume = load_volume(path)
    assert volume.metadata["format"] == "dicom"
    result = explain_volume(model, volume, ["attention"], ["malignancy"])
    out = write_dicom_maps(result, tmp_path / "out", stem="one", map_dtype="float32")
    ds = pydicom.dcmread(out / "one_attention_malignancy_pm.dcm")
    src = pydicom.dcmread(path)
    assert ds.NumberOfFrames == 1 and ds.StudyInstanceUID == src.StudyInstanceUID
    refs = [i.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence]
    assert refs == [src.SOPInstanceUID]
    np.testing.assert_array_equal(ds.pixel_array, result.map_array("attention", result.targets[0])[:, :, 0].T)


def test_int16_parametric_map_round_trip(model, tmp_path):
    """The default storage: unsigned 16-bit pixels whose real-world value mapping gives the map back
    within half a quantisation step (max|map| / 2047 / 2), zero exactly at the stored offset."""
    from medvit_explain.io.nifti import INT16_LEVELS

    write_ct_series(_ct(np.eye(3)), tmp_path / "ct", uid_seed=7)
    result = explain_volume(model, load_volume(tmp_path / "ct"), ["cdam"], ["malignancy"])
    out = write_dicom_maps(result, tmp_path / "out", stem="ct")
    ds = pydicom.dcmread(out / "ct_cdam_malignancy_pm.dcm")
    assert "PixelData" in ds and "FloatPixelData" not in ds and ds.BitsAllocated == 16
    assert ds.PixelRepresentation == 0
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    slope, intercept = float(rwvm.RealWorldValueSlope), float(rwvm.RealWorldValueIntercept)
    exact = result.map_array("cdam", "malignancy")
    peak = float(np.abs(exact).max())
    assert slope == pytest.approx(peak / INT16_LEVELS, rel=1e-6)
    assert intercept == pytest.approx(-(INT16_LEVELS + 1) * slope, rel=1e-6)
    slice_pos = exact.shape[2]
    values = ds.pixel_array.astype(np.float64) * slope + intercept  # [frames, rows, cols]
    positions = [
        np.array(g.PlanePositionSequence[0].ImagePositionPatient, float) for g in ds.PerFrameFunctionalGroupsSequence
    ]
    ks = [int(np.argmin(np.abs(result.volume.physical_to_index(p)[2] - np.arange(slice_pos)))) for p in positions]
    for n, k in enumerate(ks):
        np.testing.assert_allclose(values[n], exact[:, :, k].T, atol=0.5 * slope * (1 + 1e-4))
    assert np.abs(values).max() == pytest.approx(peak, rel=1e-3)
