"""napari plugin, headless (QT_QPA_PLATFORM=offscreen): reader geometry and the explain widget.

The viewer is napari's ``ViewerModel`` (layers, dims, ``open`` with plugins: everything but the
canvas), so no OpenGL context is needed; the widget's magicgui/Qt parts run under ``qtbot``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
nib = pytest.importorskip("nibabel")

from medvit_explain.io import load_volume, write_volume  # noqa: E402
from medvit_explain.volume import Volume  # noqa: E402

from .conftest import GEOMETRIES  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "medvit_explain" / "napari" / "napari.yaml"
ARCH = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)
SHAPE = (20, 16, 6)  # X, Y, Z
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
REVERSE = np.eye(4)[[2, 1, 0, 3]]


def _ct(tmp_path: Path, geometry=GEOMETRIES[3], name: str = "ct.nii.gz") -> Path:
    _, direction, spacing = geometry
    rng = np.random.default_rng(0)
    array = rng.normal(-700, 150, SHAPE).astype(np.float32)
    array[6:14, 4:12, 2:5] = 40.0  # a soft-tissue blob
    volume = Volume(array, (-12.5, 30.0, -101.0), spacing, direction, {"path": name})
    return write_volume(volume, tmp_path / name)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from medvit_explain.model import build_model, save_checkpoint

    torch.manual_seed(0)
    model = build_model(
        {"name": "tiny", "architecture": {"timm_name": "vit_tiny_patch16_224", "kwargs": ARCH}, "task_spec": "lidc"}
    ).eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def viewer():
    from napari.components import ViewerModel

    return ViewerModel()


@pytest.fixture(scope="module")
def plugin():
    """Register our manifest (the package may be installed without its napari entry point)."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    if "medvit-explain" not in pm._manifests:
        pm.register(PluginManifest.from_file(MANIFEST))
    return "medvit-explain"


def _file_affine_napari(path: Path) -> np.ndarray:
    """The file's own affine, read by nibabel (RAS, [X, Y, Z] index) → LPS → napari (z, y, x) order."""
    return REVERSE @ (LPS_TO_RAS @ nib.load(str(path)).affine) @ REVERSE


def test_manifest_is_valid_and_its_commands_import():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    assert manifest.name == "medvit-explain"
    manifest.validate_imports()
    assert manifest.contributions.readers[0].accepts_directories


def test_get_reader_claims_only_what_it_reads(tmp_path):
    from medvit_explain.napari._reader import get_reader

    ct = _ct(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert callable(get_reader(str(ct))) and callable(get_reader([str(ct)]))
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "empty")) is None
    assert get_reader([str(ct), str(ct)]) is None


@pytest.mark.parametrize("geometry", GEOMETRIES[1:], ids=[g[0] for g in GEOMETRIES[1:]])
def test_ct_and_overlay_layers_carry_the_files_geometry(viewer, plugin, tmp_path, geometry):
    ct_path = _ct(tmp_path, geometry)
    volume = load_volume(ct_path)
    out = tmp_path / "out"
    out.mkdir()
    # an overlay written the way the CLI writes it: <stem>_<method>_<target>.nii.gz beside summary.json
    ramp = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) - 500
    overlay_path = write_volume(volume.with_array(ramp), out / "ct_cdam-smooth_malignancy.nii.gz")
    (out / "summary.json").write_text('{"targets": ["malignancy"]}')

    [ct] = viewer.open(str(ct_path), plugin=plugin)
    [overlay] = viewer.open(str(overlay_path), plugin=plugin)

    expected = _file_affine_napari(ct_path)
    np.testing.assert_allclose(ct.affine.affine_matrix, expected, atol=1e-5)
    np.testing.assert_allclose(overlay.affine.affine_matrix, expected, atol=1e-5)
    np.testing.assert_allclose(_file_affine_napari(overlay_path), expected, atol=1e-5)
    assert ct.data.shape == overlay.data.shape == SHAPE[::-1]
    assert ct.colormap.name == "gray"
    assert overlay.metadata["medvit"]["method"] == "cdam-smooth"
    assert overlay.blending == "translucent"
    lo, hi = overlay.contrast_limits
    assert lo == pytest.approx(-hi) and hi > 0
    assert overlay.colormap.map(np.array([0.5]))[0, 3] == pytest.approx(0.0)  # 0 is transparent

    # a world point lands on the same voxel in both layers, and that voxel is the file's
    ijk = np.array([13.0, 5.0, 3.0])
    world_lps = volume.index_to_physical(ijk)
    for layer in (ct, overlay):
        np.testing.assert_allclose(layer.world_to_data(world_lps[::-1]), ijk[::-1], atol=1e-4)
    voxel = tuple(int(v) for v in ijk[::-1])
    assert overlay.data[voxel] == ramp[tuple(int(v) for v in ijk)]
    assert ct.data[voxel] == volume.array[tuple(int(v) for v in ijk)]


def test_a_nifti_named_like_an_overlay_without_summary_is_a_ct(viewer, plugin, tmp_path):
    path = _ct(tmp_path, name="lung_cdam_malignancy.nii.gz")
    [layer] = viewer.open(str(path), plugin=plugin)
    assert layer.colormap.name == "gray" and layer.metadata["medvit"]["kind"] == "ct"


def test_volume_from_layer_reads_scale_and_translate_too(viewer):
    from medvit_explain.napari._layers import volume_from_layer

    data = np.zeros((6, 16, 20), np.float32)
    layer = viewer.add_image(data, scale=(2.5, 0.7, 0.8), translate=(-100, 30, -12))
    volume = volume_from_layer(layer)
    assert volume.shape == (20, 16, 6)
    np.testing.assert_allclose(volume.spacing, (0.8, 0.7, 2.5))
    np.testing.assert_allclose(volume.origin, (-12, 30, -100))
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-12)
    with pytest.raises(ValueError, match="3D greyscale"):
        volume_from_layer(viewer.add_image(np.zeros((4, 5), np.float32)))


def test_widget_explains_the_ct_layer(viewer, plugin, qtbot, tmp_path, checkpoint):
    from medvit_explain.napari._widget import ExplainWidget

    [ct] = viewer.open(str(_ct(tmp_path, GEOMETRIES[1])), plugin=plugin)
    widget = ExplainWidget(viewer)
    qtbot.addWidget(widget.native)
    assert widget.ct_layer.value is ct
    widget.model_path.value = checkpoint
    widget.methods.value = ["cdam", "attention"]
    widget.targets.value = ["malignancy", "diameter"]
    widget.device.value = "cpu"
    widget.batch_size.value = 4

    worker = widget.run()
    assert worker is not None and not widget.run_button.enabled  # the UI thread returned at once
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)

    assert widget.status.value.startswith("done"), widget.status.value
    assert len(widget.added_layers) == 4
    for layer in widget.added_layers:
        assert layer.data.shape == ct.data.shape
        np.testing.assert_allclose(layer.affine.affine_matrix, ct.affine.affine_matrix, atol=1e-9)
        lo, hi = layer.contrast_limits
        assert lo == pytest.approx(-hi)
        assert layer.blending == "translucent"
    names = [layer.name for layer in viewer.layers]
    assert "ct attention/diameter" in names and "ct cdam/malignancy" in names
    assert widget.progress.value == widget.progress.max == SHAPE[2]
    assert widget.scores.shape[0] == SHAPE[2]
    assert widget.scores.column_headers[:4] == ("slice", "source_index", "z_mm", "malignancy_prob")
    # the CT-layer choice excludes the map layers
    assert [value for _, value in widget._ct_choices()] == [ct]
    # the map equals the pipeline's map on the same data
    result = widget.result
    # the layers are lazy (computed where napari looks) and equal the pipeline's map on the same data
    layer = widget.added_layers[1]
    assert type(layer.data).__module__.startswith("dask")
    np.testing.assert_array_equal(
        np.asarray(layer.data), result.map_array("cdam", result.targets[1]).transpose(2, 1, 0)
    )


def test_widget_reports_errors_in_its_status(viewer, plugin, qtbot, tmp_path):
    from medvit_explain.napari._widget import ExplainWidget

    viewer.open(str(_ct(tmp_path)), plugin=plugin)
    widget = ExplainWidget(viewer)
    qtbot.addWidget(widget.native)
    widget.model_path.value = tmp_path / "no_such_checkpoint"
    widget.device.value = "cpu"
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)
    assert widget.status.value.startswith("error:") and "no_such_checkpoint" in widget.status.value
    assert widget.run_button.enabled and widget.added_layers == []

    widget.methods.value = []
    assert widget.run() is None and widget.status.value == "choose at least one method"
