"""Loading DICOM: series and single files, series choice, modality, colour, spacing and corrupt files."""

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner

from medvit_explain.cli import cli
from medvit_explain.errors import (
    ModalityError,
    SeriesSelectionError,
    UnreadableImageError,
    UnsupportedImageError,
)
from medvit_explain.io import find_dicom_series, load_volume
from medvit_explain.io.dicom_series import write_ct_file, write_ct_series
from medvit_explain.volume import Volume

from .conftest import GEOMETRIES


def ct(direction=np.eye(3), spacing=(0.7, 0.8, 2.5), shape=(10, 8, 6), seed=0):
    rng = np.random.default_rng(seed)
    return Volume(rng.integers(-1000, 1500, size=shape).astype(np.float32), (-50.0, 20.0, 100.0), spacing, direction)


@pytest.mark.parametrize("name,direction,spacing", GEOMETRIES)
def test_series_round_trip(tmp_path, name, direction, spacing):
    volume = ct(direction, spacing)
    write_ct_series(volume, tmp_path / "s")
    back = load_volume(tmp_path / "s")
    # a series may come back with k reversed (readers sort by position): compare physical grids
    if not np.allclose(back.direction, volume.direction, atol=1e-5):
        flipped = Volume(
            volume.array[:, :, ::-1],
            volume.index_to_physical([0, 0, volume.shape[2] - 1]),
            volume.spacing,
            volume.direction @ np.diag([1, 1, -1]),
        )
        volume = flipped
    assert back.same_grid(volume, atol=1e-4)
    np.testing.assert_array_equal(back.array, volume.array)  # rescale slope/intercept applied: HU
    meta = back.metadata
    assert meta["format"] == "dicom-series" and meta["modality"] == "CT"
    assert len(meta["dicom_instances"]) == volume.shape[2] and meta["study_instance_uid"]


def test_single_dicom_file(tmp_path):
    volume = ct()
    path = write_ct_file(volume, tmp_path / "one.dcm", k=2)
    back = load_volume(path)
    assert back.shape == (10, 8, 1)
    np.testing.assert_array_equal(back.array[:, :, 0], volume.array[:, :, 2])
    np.testing.assert_allclose(back.origin, volume.index_to_physical([0, 0, 2]), atol=1e-4)


def test_several_series_need_a_choice(tmp_path):
    folder = tmp_path / "study"
    write_ct_series(ct(seed=1), folder, series_description="lung", uid_seed="a", filename_pattern="A{index:03d}.dcm")
    write_ct_series(
        ct(seed=2, shape=(10, 8, 4)),
        folder,
        series_description="soft",
        uid_seed="b",
        filename_pattern="B{index:03d}.dcm",
    )
    series = find_dicom_series(folder)
    assert sorted(len(s.files) for s in series) == [4, 6]
    with pytest.raises(SeriesSelectionError, match="--series") as err:
        load_volume(folder)
    assert all(s.uid in str(err.value) for s in series) and "'lung'" in str(err.value)
    soft = next(s for s in series if s.description == "soft")
    assert load_volume(folder, series_uid=soft.uid).shape == (10, 8, 4)
    with pytest.raises(SeriesSelectionError):
        load_volume(folder, series_uid="1.2.3.999")
    result = CliRunner().invoke(cli, ["inspect", str(folder), "--series", soft.uid])
    assert result.exit_code == 0 and "soft" in result.output
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exit_code == 2 and result.output.count("\n") == 1


def _rewrite(folder, change):
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        change(ds, path)
        ds.save_as(path)


def test_non_ct_refused_unless_allowed(tmp_path):
    write_ct_series(ct(), tmp_path / "mr")
    _rewrite(tmp_path / "mr", lambda ds, _: setattr(ds, "Modality", "MR"))
    with pytest.raises(ModalityError, match="allow-modality"):
        load_volume(tmp_path / "mr")
    with pytest.warns(UserWarning, match="not CT"):
        assert load_volume(tmp_path / "mr", allow_modality=True).modality == "MR"
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "mr"), "--allow-modality", "--json"])
    assert result.exit_code == 0 and '"modality": "MR"' in result.output


def test_missing_slice_refused(tmp_path):
    files = write_ct_series(ct(shape=(6, 6, 8)), tmp_path / "gap")
    files[4].unlink()
    with pytest.raises(UnsupportedImageError, match="inconsistent slice spacing"):
        load_volume(tmp_path / "gap")


def test_corrupt_dicom_refused(tmp_path):
    files = write_ct_series(ct(shape=(6, 6, 3)), tmp_path / "bad")
    raw = files[0].read_bytes()
    files[0].write_bytes(raw[: len(raw) - 40])  # pixel data cut short
    with pytest.raises((UnreadableImageError, UnsupportedImageError)):
        load_volume(files[0])
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01" * 50)
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exit_code == 2 and result.output.startswith("error:")


def test_make_phantom_cli_is_deterministic(tmp_path):
    args = [
        "make-phantom",
        None,
        "--seed",
        "5",
        "--count",
        "2",
        "--size",
        "48",
        "48",
        "16",
        "--spacing",
        "7",
        "7",
        "10",
    ]
    for out in ("a", "b"):
        args[1] = str(tmp_path / out)
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and len(names) == 10
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_list_methods_cli():
    from medvit_explain.registry import list_methods

    result = CliRunner().invoke(cli, ["list-methods"])
    assert result.exit_code == 0, result.output
    for m in list_methods():
        assert m["name"] in result.output and m["citation"] in result.output
    result = CliRunner().invoke(cli, ["list-methods", "--json"])
    import json

    from .test_registry import BUILT_IN

    names = [m["name"] for m in json.loads(result.output)]
    assert set(BUILT_IN) == set(names)  # the built-in methods, nothing else registered
