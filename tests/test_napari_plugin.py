"""napari plugin, headless (QT_QPA_PLATFORM=offscreen): reader decisions and geometry, the explain widget.

The viewer is napari's ``ViewerModel`` (layers, dims, ``open`` with plugins: everything but the
canvas), so no OpenGL context is needed; the widget's magicgui/Qt parts run under ``qtbot``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")
nib = pytest.importorskip("nibabel")

from medvit_explain.io import load_volume, write_volume  # noqa: E402
from medvit_explain.io.nifti import write_map  # noqa: E402
from medvit_explain.volume import Volume  # noqa: E402

from .conftest import GEOMETRIES  # noqa: E402

MANIFEST = Path(__file__).resolve().parents[1] / "medvit_explain" / "napari" / "napari.yaml"
ARCH = dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)
SHAPE = (20, 16, 6)  # X, Y, Z
GEOMETRY = {g[0]: g for g in GEOMETRIES}
# napari's (expected) note on oblique layers: it shows the nearest voxel-axis slice, as the CLI explains it
pytestmark = pytest.mark.filterwarnings("ignore:Non-orthogonal slicing:UserWarning")


def _volume(geometry=GEOMETRIES[3], array=None, name: str = "ct.nii.gz") -> Volume:
    _, direction, spacing = geometry
    if array is None:
        array = np.random.default_rng(0).normal(-700, 150, SHAPE).astype(np.float32)
        array[6:14, 4:12, 2:5] = 40.0  # a soft-tissue blob
    return Volume(array, (-12.5, 30.0, -101.0), spacing, direction, {"path": name})


def _ct(tmp_path: Path, geometry=GEOMETRIES[3], name: str = "ct.nii.gz") -> Path:
    return write_volume(_volume(geometry, name=name), tmp_path / name)


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


def _same_voxels(layer, volume: Volume, points) -> None:
    """Each voxel index of ``volume`` (the file) lands, through the layer's world geometry, on a data
    voxel of the layer holding the file's value there."""
    for ijk in points:
        world = volume.index_to_physical(np.asarray(ijk, dtype=np.float64))[::-1]  # LPS → napari (z, y, x)
        data = np.asarray(layer.world_to_data(world))
        np.testing.assert_allclose(data, np.round(data), atol=1e-4)
        assert layer.data[tuple(int(round(v)) for v in data)] == volume.array[tuple(ijk)]


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


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def test_reorientation_is_the_clis(geometry):
    """The reader's LPS reorientation is the CLI's (``orientation_of`` + ``reoriented_view``, a view), and
    the reoriented grid keeps every voxel at its world position."""
    from medvit_explain.napari._layers import reoriented_volume
    from medvit_explain.transforms import orientation_of, reoriented_view

    volume = _volume(geometry)
    shown = reoriented_volume(volume)
    assert shown.metadata["display_ornt"] == orientation_of(volume).astype(int).tolist()
    np.testing.assert_array_equal(shown.array, reoriented_view(volume.array, orientation_of(volume)))
    assert np.shares_memory(shown.array, volume.array)
    canon = np.argwhere(np.ones(shown.shape, bool))[::37]
    source = np.round(volume.physical_to_index(shown.index_to_physical(canon))).astype(int)
    np.testing.assert_array_equal(shown.array[tuple(canon.T)], volume.array[tuple(source.T)])
    # the shown axes point to L, P, S (positive diagonal dominates): data axis 0 of the layer is axial
    assert np.all(np.argmax(np.abs(shown.direction), axis=0) == [0, 1, 2]) and np.all(np.diag(shown.direction) > 0)


@pytest.mark.parametrize("geometry", GEOMETRIES[1:], ids=[g[0] for g in GEOMETRIES[1:]])
def test_a_studys_layers_line_up_in_world_coordinates(viewer, plugin, tmp_path, geometry):
    """CT, label map and overlay of one non-axial study: shown reoriented (axial slider) and aligned."""
    ct_path = _ct(tmp_path, geometry)
    volume = load_volume(ct_path)
    out = tmp_path / "out"
    out.mkdir()
    # an overlay written the way the CLI writes it: <stem>_<method>_<target>.nii.gz beside summary.json
    ramp = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) - 500
    overlay_path = write_volume(volume.with_array(ramp), out / "ct_cdam-smooth_malignancy.nii.gz")
    (out / "summary.json").write_text('{"targets": ["malignancy"]}')
    mask = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3).astype(np.float32)
    mask_path = write_volume(volume.with_array(mask), tmp_path / "ct_lungs.nii.gz", dtype=np.uint8)

    [ct] = viewer.open(str(ct_path), plugin=plugin)
    [overlay] = viewer.open(str(overlay_path), plugin=plugin)
    [labels] = viewer.open(str(mask_path), plugin=plugin)

    assert isinstance(labels, napari.layers.Labels) and labels.data.dtype == np.uint8
    np.testing.assert_allclose(overlay.affine.affine_matrix, ct.affine.affine_matrix, atol=1e-5)
    np.testing.assert_allclose(labels.affine.affine_matrix, ct.affine.affine_matrix, atol=1e-5)
    assert ct.data.shape == overlay.data.shape == labels.data.shape
    # data axis 0 (the slider) runs towards superior: world z of the napari affine
    linear = np.asarray(ct.affine.affine_matrix)[:3, :3]
    assert np.argmax(np.abs(linear[:, 0])) == 0 and linear[0, 0] > 0
    assert ct.metadata["medvit"]["display_ornt"] is not None

    points = [(13, 5, 3), (0, 0, 0), (19, 15, 5), (7, 11, 1)]
    _same_voxels(ct, volume, points)
    _same_voxels(overlay, volume.with_array(ramp), points)
    _same_voxels(labels, volume.with_array(mask), points)


def test_reader_decisions(viewer, plugin, tmp_path):
    """Overlay by NIfTI description or name + summary.json; labels by name, intent or integer content;
    everything else (fractions, negative values, many values, a name alone) a CT with the HU window."""
    geometry = GEOMETRY["oblique"]
    rng = np.random.default_rng(1)
    base = _volume(geometry)
    few = rng.integers(0, 4, SHAPE).astype(np.float32)
    many = rng.permutation(np.arange(np.prod(SHAPE)) % 1000).reshape(SHAPE).astype(np.float32)
    signed = rng.normal(0, 1e-3, SHAPE).astype(np.float32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"targets": ["malignancy"]}')
    moved = tmp_path / "moved"
    moved.mkdir()
    write_map(signed, base, moved / "renamed.nii.gz", description="cdam malignancy")  # int16, as explain writes
    write_map(signed, base, moved / "other.nii.gz", description="unknownmethod malignancy")
    write_volume(base.with_array(signed), out / "ct_agcam_malignancy.nii.gz")
    write_volume(base.with_array(signed), out / "ct_agcam_diameter.nii.gz")  # not a target of summary.json
    write_volume(base, tmp_path / "lung_cdam_malignancy.nii.gz")
    write_volume(base.with_array(few), tmp_path / "phantom_nodules.nii.gz", dtype=np.int16)
    write_volume(base.with_array(few * 2), tmp_path / "case-seg.nrrd", dtype=np.uint8)
    write_volume(base.with_array(few), tmp_path / "atlas.mha", dtype=np.uint8)
    write_volume(base.with_array(many), tmp_path / "uint_ct.nii.gz", dtype=np.uint16)
    write_volume(base.with_array(few + 0.5), tmp_path / "prob_mask.nii.gz")
    write_volume(base.with_array(few - 1), tmp_path / "signed_mask.nii.gz", dtype=np.int16)
    write_volume(base.with_array(few), tmp_path / "ct_int16.nii.gz", dtype=np.int16)  # few values, signed type
    intent = nib.Nifti1Image(few.astype(np.float32), base.affine_ras)
    intent.header.set_intent("label")
    nib.save(intent, tmp_path / "structures.nii.gz")

    expected = {
        "moved/renamed.nii.gz": ("overlay", "description"),
        "moved/other.nii.gz": ("ct", "neither"),
        "out/ct_agcam_malignancy.nii.gz": ("overlay", "summary.json"),
        "out/ct_agcam_diameter.nii.gz": ("ct", "neither"),
        "lung_cdam_malignancy.nii.gz": ("ct", "neither"),
        "phantom_nodules.nii.gz": ("labels", "_nodules"),
        "case-seg.nrrd": ("labels", "-seg"),
        "structures.nii.gz": ("labels", "intent"),
        "ct_int16.nii.gz": ("labels", "4 distinct values"),
        "atlas.mha": ("labels", "4 distinct values"),
        "uint_ct.nii.gz": ("ct", "neither"),
        "prob_mask.nii.gz": ("ct", "fractions"),
        "signed_mask.nii.gz": ("ct", "values < 0"),
    }
    for name, (kind, why) in expected.items():
        [layer] = viewer.open(str(tmp_path / name), plugin=plugin)
        meta = layer.metadata["medvit"]
        assert (meta["kind"], why in meta["reason"]) == (kind, True), (name, meta["reason"])
        assert isinstance(layer, napari.layers.Labels) == (kind == "labels"), name
        if kind == "ct":
            assert layer.colormap.name == "gray" and tuple(layer.contrast_limits) == (-1000.0, 400.0)
            assert not layer.colorbar.visible
        if kind == "overlay":
            lo, hi = layer.contrast_limits
            assert lo == pytest.approx(-hi) and hi > 0
            assert layer.colormap.map(np.array([0.5]))[0, 3] == pytest.approx(0.0)  # 0 is transparent
            assert layer.colorbar.visible and layer.blending == "translucent"
        if kind == "labels":
            np.testing.assert_array_equal(np.unique(layer.data), np.unique(few * (2 if "seg" in name else 1)))
    by_name = {layer.name: layer for layer in viewer.layers}
    assert by_name["renamed cdam/malignancy"].metadata["medvit"]["method"] == "cdam"
    assert by_name["ct agcam/malignancy"].metadata["medvit"]["target"] == "malignancy"


def test_reader_asks_the_cli_for_methods_when_torch_is_not_loaded(monkeypatch):
    """Opening a file never imports torch into napari: without it, the method list comes from the CLI."""
    from medvit_explain.napari import _reader
    from medvit_explain.outputs import layout

    calls = []
    monkeypatch.setattr(_reader, "_torch_loaded", lambda: False)
    monkeypatch.setattr(layout, "known_methods", lambda: calls.append(1) or ["cdam"])
    assert _reader.method_names() == ["cdam"] and calls == [1]


def test_reading_files_never_imports_torch(tmp_path):
    """napari's process stays free of torch when it opens a CT, a label map and an overlay."""
    import subprocess
    import sys

    base = _volume(GEOMETRY["flipped"])
    paths = [
        write_volume(base, tmp_path / "ct.nii.gz"),
        write_volume(base.with_array(np.ones(SHAPE, np.float32)), tmp_path / "ct_lungs.nii.gz", dtype=np.uint8),
        write_map(np.full(SHAPE, 0.5, np.float32), base, tmp_path / "map.nii.gz", description="cdam malignancy"),
    ]
    code = (
        "import sys\n"
        "from medvit_explain.napari._reader import layer_data_tuples\n"
        f"kinds = [layer_data_tuples(p)[0][1]['metadata']['medvit']['kind'] for p in {[str(p) for p in paths]!r}]\n"
        "print(kinds, 'torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "['ct', 'labels', 'overlay'] False"


def test_label_values_scans_without_a_full_copy_and_stops_early():
    from medvit_explain.napari._reader import label_values

    a = np.zeros((64, 64, 40), np.float32)
    a[..., 30:] = 7
    np.testing.assert_array_equal(label_values(a), [0, 7])
    a[0, 0, 39] = 0.5
    assert label_values(a) is None
    b = np.arange(64 * 64 * 40, dtype=np.float32).reshape(64, 64, 40)
    assert label_values(b) is None and len(label_values(b, limit=None)) == b.size


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


def _widget(viewer, qtbot, checkpoint, methods=("cdam",), targets=("malignancy",), batch_size=4):
    from medvit_explain.napari._widget import ExplainWidget

    widget = ExplainWidget(viewer)
    qtbot.addWidget(widget.native)
    widget.model_path.value = checkpoint
    widget.methods.value = list(methods)
    widget.targets.value = list(targets)
    widget.device.value = "cpu"
    widget.batch_size.value = batch_size
    return widget


def test_widget_explains_the_ct_layer(viewer, plugin, qtbot, tmp_path, checkpoint, monkeypatch):
    """A permuted (sagittal-like) CT: shown reoriented, explained on the shown grid, maps aligned, one
    colour bar (the selected map's), a click on a score row moves the slider to that axial slice."""
    ct_path = _ct(tmp_path, GEOMETRY["permuted"])
    [ct] = viewer.open(str(ct_path), plugin=plugin)
    n_axial = ct.data.shape[0]
    assert n_axial == SHAPE[1]  # the permuted file's j axis runs superior: it is the slider now
    widget = _widget(viewer, qtbot, checkpoint, ["cdam", "attention"], ["malignancy", "diameter"])
    assert widget.ct_layer.value is ct

    worker = widget.run()
    assert worker is not None and not widget.run_button.enabled and widget.cancel_button.enabled
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)

    assert widget.status.value.startswith("done"), widget.status.value
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert len(widget.added_layers) == 4
    for layer in widget.added_layers:
        assert layer.data.shape == ct.data.shape
        np.testing.assert_allclose(layer.affine.affine_matrix, ct.affine.affine_matrix, atol=1e-9)
        lo, hi = layer.contrast_limits
        assert lo == pytest.approx(-hi)
        assert layer.blending == "translucent"
    assert [layer.colorbar.visible for layer in widget.added_layers] == [False, False, False, True]
    viewer.layers.selection.active = widget.added_layers[0]
    assert [layer.colorbar.visible for layer in widget.added_layers] == [True, False, False, False]
    names = [layer.name for layer in viewer.layers]
    assert "ct attention/diameter" in names and "ct cdam/malignancy" in names
    assert widget.progress.value == widget.progress.max == n_axial
    assert widget.scores.shape[0] == n_axial
    assert widget.scores.column_headers[:4] == ("slice", "source_index", "z_mm", "malignancy_prob")
    assert [value for _, value in widget._ct_choices()] == [ct]  # the CT-layer choice excludes the maps
    # the layers are lazy (computed where napari looks) and equal the pipeline's map on the same data
    result = widget.result
    layer = widget.added_layers[1]
    assert type(layer.data).__module__.startswith("dask")
    np.testing.assert_array_equal(
        np.asarray(layer.data), result.map_array("cdam", result.targets[1]).transpose(2, 1, 0)
    )

    # explaining the shown (reoriented) grid is explaining the file: the CLI's scores, its map in world space
    from medvit_explain.model import load_model
    from medvit_explain.napari._layers import layer_data, reoriented_volume
    from medvit_explain.pipeline import explain_volume

    direct = explain_volume(load_model(checkpoint, device="cpu"), load_volume(ct_path), ["cdam"], ["malignancy"])
    for key in ("slice", "z_mm", "malignancy_prob"):
        np.testing.assert_allclose([r[key] for r in widget._rows], [r[key] for r in direct.predictions.rows], rtol=1e-5)
    shown = layer_data(reoriented_volume(direct.map_volume("cdam", "malignancy")))
    np.testing.assert_allclose(np.asarray(widget.added_layers[0].data), shown, rtol=1e-5, atol=1e-7)

    # the best slice is shown; then a click on a row shows that row's slice
    def shown_slice() -> float:
        return float(ct.world_to_data(viewer.dims.point)[0])

    best = max(widget._rows, key=lambda r: r["malignancy_prob"])
    assert shown_slice() == pytest.approx(best["source_index"])
    table = widget.scores.native
    for row in (3, n_axial - 1):
        table.scrollToItem(table.item(row, 0))
        rect = table.visualItemRect(table.item(row, 0))
        qtbot.mouseClick(table.viewport(), _left(), pos=rect.center())
        assert shown_slice() == pytest.approx(widget._rows[row]["source_index"])
        assert widget._rows[row]["source_index"] == widget._rows[row]["slice"]  # the shown grid is canonical
        assert viewer.dims.point[0] == pytest.approx(widget._rows[row]["z_mm"], abs=1e-3)  # world z = its z

    # a result that arrives after Cancel adds nothing, and a failing add leaves no half of a run
    before = list(viewer.layers)
    cancelled = threading.Event()
    cancelled.set()
    widget._show(result, ct, cancelled)
    assert list(viewer.layers) == before
    calls = []
    real_add = type(viewer).add_image

    def add_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("no room")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(type(viewer), "add_image", add_then_fail)
    with pytest.raises(RuntimeError, match="no room"):
        widget._show(result, ct, threading.Event())
    assert list(viewer.layers) == before and len(widget.added_layers) == 4
    assert widget.status.value.startswith("error: adding the maps failed, none was added (no room)")


def _left():
    from qtpy.QtCore import Qt

    return Qt.MouseButton.LeftButton


@pytest.mark.parametrize("name", ["oblique", "flipped", "permuted"])
def test_row_jump_lands_on_the_rows_slice_in_the_layout_shown(viewer, name):
    """A CT layer as another reader may show it (not reoriented): the row's ``source_index`` counts along
    the volume axis the explain sliced, which is data axis ``2 - axis`` of the layer; the slider goes there
    and the other data coordinates stay (exactly, on an oblique layer too)."""
    from types import SimpleNamespace

    from medvit_explain.napari._layers import napari_affine
    from medvit_explain.napari._widget import ExplainWidget
    from medvit_explain.transforms import orientation_of

    volume = _volume(GEOMETRY[name])
    ct = viewer.add_image(volume.array.transpose(2, 1, 0), affine=napari_affine(volume.affine_lps), name="ct")
    widget = ExplainWidget(viewer)
    ornt = orientation_of(volume)
    axis = int(np.argsort(ornt[:, 0])[2])  # the source axis that became the canonical k
    data_axis = 2 - axis
    assert data_axis == {"oblique": 0, "flipped": 0, "permuted": 1}[name]
    widget.result = SimpleNamespace(inputs=SimpleNamespace(ornt=ornt), volume=volume)
    widget._shown_on = ct
    n = SHAPE[axis]
    widget._rows = [{"slice": n - 1 - k, "source_index": k, "z_mm": 0.0} for k in range(n)]
    for k in (4, 0, n - 1):
        before = np.clip(np.asarray(ct.world_to_data(viewer.dims.point)), 0, np.array(ct.data.shape) - 1)
        assert widget.go_to_row(k)
        after = np.asarray(ct.world_to_data(viewer.dims.point))
        assert after[data_axis] == pytest.approx(k, abs=1e-6)
        others = [a for a in range(3) if a != data_axis]
        np.testing.assert_allclose(after[others], before[others], atol=1e-6)
    assert not widget.go_to_row(n) and not widget.go_to_row(-1)


def test_cancel_stops_between_batches_and_adds_nothing(viewer, plugin, qtbot, tmp_path, checkpoint, monkeypatch):
    """Cancel pressed while a batch runs: the next batch never starts, no layer is added, the UI is ready."""
    import medvit_explain.pipeline as pipeline

    [ct] = viewer.open(str(_ct(tmp_path, GEOMETRY["flipped"])), plugin=plugin)
    widget = _widget(viewer, qtbot, checkpoint, batch_size=1)
    batches, reached, gate = [], threading.Event(), threading.Event()
    real_explain = pipeline.explain_volume

    def explain_volume(*args, progress=None, **kwargs):
        def counted(n):  # runs in the worker thread after each batch
            batches.append(n)
            reached.set()
            gate.wait(30)  # hold the worker until the test has pressed Cancel
            progress(n)

        return real_explain(*args, progress=counted, **kwargs)

    monkeypatch.setattr(pipeline, "explain_volume", explain_volume)
    assert widget.run() is not None
    qtbot.waitUntil(reached.is_set, timeout=30_000)
    widget.cancel_button.native.click()
    assert widget.status.value.startswith("cancelling") and not widget.cancel_button.enabled
    gate.set()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=30_000)

    assert batches == [1]  # stopped after the first of SHAPE[2] batches
    assert widget.status.value == "cancelled"
    assert list(viewer.layers) == [ct] and widget.added_layers == [] and widget.result is None
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    assert widget.scores.shape[0] == 0


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
    widget.cancel()  # nothing runs: a no-op
    assert widget.status.value == "choose at least one method"


def test_widget_explains_rois_at_the_points_of_a_points_layer(viewer, plugin, qtbot):
    """Points on the sample CT's two nodules: the shipped sample-roi explains an ROI around each (the CLI's
    --roi-centers, same scores), the maps lie on the CT grid and vanish away from the ROIs, the view goes to
    the most malignant nodule's centre and a click on a row of the other nodule goes to that one."""
    import json

    from medvit_explain.model import load_model
    from medvit_explain.napari._widget import ExplainWidget, centres_from_points
    from medvit_explain.pipeline import explain_volume

    sample = Path(__file__).resolve().parents[1] / "sample_data"
    ct = next(layer for layer in viewer.open(str(sample / "phantom_001.nii.gz"), plugin=plugin) if layer.ndim == 3)
    nodules = json.loads((sample / "phantom_001.json").read_text())["nodules"]
    lps = np.array([n["center_mm"] for n in nodules], dtype=np.float64)
    points = viewer.add_points(lps[:, ::-1], name="nodules", ndim=3)  # napari world: LPS as (z, y, x)
    np.testing.assert_allclose(centres_from_points(points), lps, atol=1e-9)

    widget = ExplainWidget(viewer)
    qtbot.addWidget(widget.native)
    assert widget.centres.value is None  # never picked for the user: slices unless a points layer is chosen
    widget.centres.value = points
    widget.methods.value = ["cdam"]
    widget.targets.value = ["malignancy", "spiculation"]
    widget.device.value = "cpu"
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=120_000)
    assert widget.status.value.startswith("done; highest malignancy_prob"), widget.status.value

    direct = explain_volume(
        load_model("sample-roi", device="cpu"),
        load_volume(sample / "phantom_001.nii.gz"),
        ["cdam"],
        ["malignancy", "spiculation"],
        roi_centers=lps,
    )
    assert [r["view"] for r in widget._rows] == [r["view"] for r in direct.predictions.rows]
    np.testing.assert_allclose(
        [r["malignancy_prob"] for r in widget._rows], [r["malignancy_prob"] for r in direct.predictions.rows], rtol=1e-5
    )
    assert widget.progress.value == widget.progress.max == 2 * 3  # two nodules, three views each
    assert widget.scores.column_headers[:3] == ("roi", "label", "view")
    assert len(widget.added_layers) == 2
    data = np.asarray(widget.added_layers[1].data)
    assert data.shape == ct.data.shape and np.abs(data).max() > 0
    assert data[0].max() == 0 and data[-1].max() == 0  # the first and last slices are far from both ROIs
    np.testing.assert_allclose(
        data, np.asarray(direct.map_array("cdam", "spiculation")).transpose(2, 1, 0), rtol=1e-5, atol=1e-7
    )
    # the window is the shown map's, as for the CLI's overlay file opened in napari (not the wider one of
    # the model-resolution maps, which the views' average inside the cubes never reaches)
    from medvit_explain.napari._layers import overlay_layer_data

    _, file_kwargs, _ = overlay_layer_data(direct.map_volume("cdam", "spiculation"), "cdam", "spiculation")
    np.testing.assert_allclose(widget.added_layers[1].contrast_limits, file_kwargs["contrast_limits"], rtol=1e-5)

    means = [r for r in widget._rows if r["view"] == "mean"]
    best = max(means, key=lambda r: r["malignancy_prob"])
    np.testing.assert_allclose(viewer.dims.point[-3:], lps[best["roi"]][::-1], atol=1e-6)
    other = next(i for i, r in enumerate(widget._rows) if r["view"] == "mean" and r["roi"] != best["roi"])
    assert widget.go_to_row(other)
    np.testing.assert_allclose(viewer.dims.point[-3:], lps[widget._rows[other]["roi"]][::-1], atol=1e-6)

    points.data = np.zeros((0, 3))
    assert widget.run() is None and "has no points" in widget.status.value
