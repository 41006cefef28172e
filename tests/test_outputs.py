"""The output layer: compact int16 overlays (values, geometry, scl_slope), the float32 option, names,
streaming one map at a time, and no partial file when a write fails."""

from __future__ import annotations

import gzip
import json
import threading

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from medvit_explain import outputs, viewer_logic
from medvit_explain.cli import cli
from medvit_explain.io import load_volume, write_volume
from medvit_explain.io.nifti import INT16_LEVELS, int16_slope, write_map
from medvit_explain.outputs import write_outputs
from medvit_explain.pipeline import explain_volume
from medvit_explain.volume import Volume

from .conftest import GEOMETRIES
from .models import tiny_checkpoint, tiny_model


def _map(shape, seed=0, positive=False):
    """A smooth signed map with a few sharp values (the kind of content a projected map has)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    m = np.sin(6 * x) * np.cos(4 * y) + 0.3 * z + 0.05 * rng.normal(size=shape)
    return (np.abs(m) if positive else m).astype(np.float32) * 3.7e-3


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_int16_overlay_round_trip(tmp_path, name, direction, spacing):
    """Every reader sees the map within half a quantisation step (max|map| / INT16_LEVELS / 2), on the
    source grid exactly; on disk it is int16 with scl_slope = max|map| / INT16_LEVELS, scl_inter 0."""
    like = Volume(np.zeros((23, 17, 9), np.float32), (-12.5, 40.25, 3.0), spacing, direction)
    exact = _map(like.shape, seed=1)
    path = write_map(exact, like, tmp_path / "m.nii.gz")
    slope = float(np.abs(exact).max()) / INT16_LEVELS
    half_step = 0.5 * slope * (1 + 1e-3)  # readers scale in float32: a few ulps on top

    img = nib.load(str(path))
    assert img.get_data_dtype() == np.int16
    assert img.dataobj.slope == pytest.approx(slope, rel=1e-6) and img.dataobj.inter == 0
    raw = np.asarray(img.dataobj.get_unscaled())
    assert np.abs(raw).max() == INT16_LEVELS  # the peak uses the last level, nothing overflows
    np.testing.assert_allclose(img.get_fdata(), exact, atol=half_step, rtol=0)
    np.testing.assert_allclose(img.affine, like.affine_ras, atol=1e-5)

    image = sitk.ReadImage(str(path))  # ITK applies the slope: what 3D Slicer and napari read
    np.testing.assert_allclose(sitk.GetArrayFromImage(image).transpose(2, 1, 0), exact, atol=half_step, rtol=0)
    np.testing.assert_allclose(image.GetOrigin(), like.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), like.spacing, atol=1e-5)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), like.direction, atol=1e-5)

    back = load_volume(path)
    assert back.same_grid(like, atol=1e-4)
    np.testing.assert_allclose(back.array, exact, atol=half_step, rtol=0)
    assert gzip.decompress(path.read_bytes())[:4] == (348).to_bytes(4, "little")  # one plain gzip stream


def test_float32_overlay_is_exact_and_zero_map_is_safe(tmp_path):
    like = Volume(np.zeros((11, 13, 4), np.float32), (1.0, 2.0, 3.0), (0.5, 0.5, 2.0), np.eye(3))
    exact = _map(like.shape, seed=2, positive=True)
    path = write_map(exact, like, tmp_path / "f.nii.gz", dtype="float32", description="agcam texture")
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), exact)
    assert img.header["descrip"].tobytes().rstrip(b"\0") == b"agcam texture"
    zero = write_map(np.zeros(like.shape, np.float32), like, tmp_path / "z.nii.gz")
    assert int16_slope(np.zeros(3)) == 1.0 and not nib.load(str(zero)).get_fdata().any()
    with pytest.raises(ValueError, match="expected a map dtype"):
        write_map(exact, like, tmp_path / "x.nii.gz", dtype="float16")
    with pytest.raises(ValueError, match="expected a map of shape"):
        write_map(exact[:-1], like, tmp_path / "x.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.nii.gz", "z.nii.gz"]


def test_names_live_in_one_place():
    """The viewers parse the names the output layer writes (the same functions, not copies)."""
    assert viewer_logic.parse_overlay_name is outputs.parse_overlay_name
    assert viewer_logic.find_outputs is outputs.find_outputs and viewer_logic.volume_stem is outputs.volume_stem
    name = outputs.overlay_name("lung_ct_01", "cdam-smooth", "malignancy")
    assert name == "lung_ct_01_cdam-smooth_malignancy.nii.gz"
    assert outputs.parse_overlay_name(name) == ("lung_ct_01", "cdam-smooth", "malignancy")
    assert outputs.volume_stem("/data/scan.NII.GZ/") == "scan" and outputs.volume_stem("/data/series_7/") == "series_7"


def _phantom_result(targets=None, methods=("cdam", "agcam")):
    from medvit_explain.phantom import generate_phantom

    ph = generate_phantom(3, size=(48, 40, 10), spacing=(3.0, 3.5, 4.0), n_nodules=1)
    model = tiny_model(image_size=(32, 32), patch=8, crop_body=True)
    return explain_volume(model, ph.ct, list(methods), targets, batch_size=4)


def test_result_holds_model_resolution_maps_only():
    """Nothing on the source grid is kept: per method one [slices, T, gh, gw] tensor."""
    result = _phantom_result()
    n_slices = result.inputs.n_slices
    for m in result.methods:
        assert tuple(result.model_maps[m].shape) == (n_slices, len(result.targets), 4, 4)
    held = sum(t.numel() * t.element_size() for t in result.model_maps.values())
    n_maps = len(result.methods) * len(result.targets)
    assert held == n_maps * n_slices * 4 * 4 * 4  # float32 token grids
    assert 10 * held < n_maps * result.volume.array.nbytes  # what maps on the grid would hold
    assert not any(isinstance(v, np.ndarray) and v.size >= result.volume.array.size for v in vars(result).values())


@pytest.mark.parametrize("workers", [1, 2])
def test_overlays_stream_one_map_per_worker(tmp_path, monkeypatch, workers):
    """write_outputs projects each (method, target) exactly once, never more than ``workers`` at a time,
    and writes what map_array returns."""
    result = _phantom_result()
    live, peak, calls, lock = [0], [0], [], threading.Lock()
    original = type(result).map_array

    def counting(self, method, target):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            calls.append((method, target))
        try:
            return original(self, method, target)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(type(result), "map_array", counting)
    written = write_outputs(result, tmp_path, stem="ph", report=False, workers=workers, map_dtype="float32")
    assert sorted(calls) == sorted((m, t) for m in result.methods for t in result.targets)
    assert peak[0] <= workers
    for m in result.methods:
        for t in result.targets:
            got = load_volume(written[f"{m}/{t}"])
            np.testing.assert_array_equal(got.array, original(result, m, t))
            assert got.same_grid(result.volume)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["map_dtype"] == "float32" and summary["timings_s"]["project"] > 0


def test_failed_overlay_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that fails (a full disk) raises one OutputError; nothing is left: no temporary file, no
    staging folder, and none of the overlays that were complete (all or nothing)."""
    import medvit_explain.outputs.writing as writing
    from medvit_explain.errors import OutputError

    result = _phantom_result(targets=["malignancy", "texture"])
    real = writing.write_map

    def full_disk(array, like, path, **kw):
        if "texture" not in path.name:
            return real(array, like, path, **kw)
        with writing.atomic_path(path) as tmp:  # the disk fills half-way through this overlay
            tmp.write_bytes(b"half an overlay")
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(writing, "write_map", full_disk)
    with pytest.raises(OutputError, match="No space left on device .free some space"):
        write_outputs(result, tmp_path / "out", stem="ph", report=False, workers=1)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_cli_int16_default_equals_float32_within_tolerance(tmp_path):
    """`explain` writes int16 overlays by default, equal to the --map-dtype float32 ones within
    1e-3 of each map's max |value| (in fact half a step: max / 4094), on the same grid."""
    from medvit_explain.phantom import generate_phantom

    ph = generate_phantom(5, size=(40, 36, 6), spacing=(3.0, 3.0, 4.0), n_nodules=1)
    ct = write_volume(ph.ct, tmp_path / "ct.nii.gz")
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    base = ["explain", str(ct), "--model", str(ckpt), "--no-report", "--target", "malignancy", "--target", "texture"]
    for dtype in ("int16", "float32"):
        extra = [] if dtype == "int16" else ["--map-dtype", "float32"]
        res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / dtype), *extra])
        assert res.exit_code == 0, res.output
    for m in ("cdam", "agcam"):
        for t in ("malignancy", "texture"):
            small = nib.load(str(tmp_path / "int16" / f"ct_{m}_{t}.nii.gz"))
            exact = nib.load(str(tmp_path / "float32" / f"ct_{m}_{t}.nii.gz"))
            assert small.get_data_dtype() == np.int16 and exact.get_data_dtype() == np.float32
            a, b = small.get_fdata(), exact.get_fdata()
            peak = np.abs(b).max()
            assert peak > 0 and np.abs(a - b).max() <= max(1e-3 * peak, 0.5 * peak / INT16_LEVELS * (1 + 1e-3))
            np.testing.assert_allclose(small.affine, exact.affine)
    assert json.loads((tmp_path / "int16" / "summary.json").read_text())["map_dtype"] == "int16"
    res = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "bad"), "--map-dtype", "float16"])
    assert res.exit_code == 2 and not (tmp_path / "bad").exists()


def test_projection_on_the_maps_device_matches_cpu():
    """Projection runs where the maps are; on the CPU the result is what the two bilinear resizes give."""
    result = _phantom_result(targets=["malignancy"], methods=("cdam",))
    maps = result.model_maps["cdam"][:, 0]
    on_grid = result.map_array("cdam", "malignancy")
    crop = result.inputs.crop_maps(maps)  # [slices, rows, cols]
    ref = torch.nn.functional.interpolate(maps[:, None], size=result.inputs.image_size, mode="bilinear")
    ref = torch.nn.functional.interpolate(ref, size=result.inputs.crop_shape, mode="bilinear")[:, 0]
    torch.testing.assert_close(crop, ref, rtol=0, atol=1e-6)
    from medvit_explain.transforms import reoriented_view

    x0, x1, y0, y1 = result.inputs.box
    canon = reoriented_view(on_grid, result.inputs.ornt)
    np.testing.assert_array_equal(canon[x0:x1, y0:y1], crop.numpy().transpose(2, 1, 0))
    assert not canon[:x0].any() and not canon[x1:].any()
