"""The 3D Slicer module, end to end, against stand-in ``slicer`` / ``qt`` / ``vtk`` / ``ctk`` modules.

The real ``plugins/slicer/MedViTExplain/MedViTExplain.py`` is imported with the fakes of
``tests/slicer_fakes`` in ``sys.modules``; its widget is driven through its .ui file's widgets and its
logic runs the real medvit-explain CLI in a subprocess (``.venv/bin/medvit-explain``, else
``python -m medvit_explain``) on a crop of ``sample_data/phantom_000.nii.gz`` around its nodules.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import sys
import time
import unittest
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.slicer_fakes import installed, load_module

ROOT = Path(__file__).resolve().parents[1]
MODULE_PATH = ROOT / "plugins" / "slicer" / "MedViTExplain" / "MedViTExplain.py"
SAMPLE = ROOT / "sample_data" / "phantom_000.nii.gz"
VENV_CLI = ROOT / ".venv" / "bin" / "medvit-explain"
CLI = [str(VENV_CLI)] if VENV_CLI.is_file() else [sys.executable, "-m", "medvit_explain"]
EXECUTABLE = CLI[0]  # the console script, or this interpreter (the module adds "-m medvit_explain")
POSIX = os.name == "posix"


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """The slices of the sample phantom from two below its lowest nodule centre to two above its highest
    (all of its nodules), written as NIfTI; and the nodules' centres."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(SAMPLE))
    nodules = json.loads(SAMPLE.with_suffix("").with_suffix(".json").read_text())["nodules"]
    ks = [image.TransformPhysicalPointToIndex(n["center_mm"])[2] for n in nodules]
    crop = image[:, :, max(min(ks) - 2, 0) : min(max(ks) + 3, image.GetSize()[2])]
    path = tmp_path_factory.mktemp("ct") / "small_ct.nii.gz"
    sitk.WriteImage(crop, str(path))
    return SimpleNamespace(path=path, centres_lps=[n["center_mm"] for n in nodules], slices=crop.GetSize()[2])


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """The fakes in sys.modules and the real module imported against them (once: the method list read
    through the CLI is kept for the whole file, as in one Slicer session)."""
    with installed(tmp_path_factory.mktemp("slicer-temp")) as slicer:
        module = load_module(MODULE_PATH)
        yield SimpleNamespace(slicer=slicer, module=module)


@pytest.fixture
def env(fakes, tmp_path, small_ct):
    """A fresh application, scene and settings per test, the CLI configured as an existing executable."""
    slicer, module = fakes.slicer, fakes.module
    temp = tmp_path / "slicer-temp"
    temp.mkdir()
    slicer.reset(temp)
    import qt

    qt.QSettings().setValue(module.EXECUTABLE_SETTING, EXECUTABLE)
    yield SimpleNamespace(slicer=slicer, module=module, temp=temp, ct=small_ct, tmp=tmp_path)


def wait_for(slicer, condition, timeout=180.0):
    """Run Slicer's event loop until ``condition()`` (what the user's Slicer does between clicks)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        slicer.app.processEvents()
        time.sleep(0.01)


def load_ct_in_study(slicer, path):
    ct = slicer.util.loadVolume(str(path))
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    study = sh.CreateStudyItem(sh.CreatePatientItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.SetItemParent(sh.GetItemByDataNode(ct), study)
    return ct, study


def make_widget(env):
    widget = env.module.MedViTExplainWidget(env.slicer.qMRMLWidget())
    widget.setup()
    wait_for(env.slicer, lambda: widget.methodQuery is None, 120)
    return widget


def finish(env, widget, timeout=180.0):
    run = widget.run
    assert run is not None, widget.ui.statusLabel.text
    wait_for(env.slicer, lambda: not run.running, timeout)
    return run


def temp_folders(env):
    return sorted(p.name for p in env.temp.iterdir() if p.name.startswith(env.module.TEMP_PREFIX))


def live_group_members(pgid):
    """PIDs of processes in group ``pgid`` that are running (not zombies), from /proc (Linux)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            members.append(int(entry.name))
    return members


def matrix(array):
    return sys.modules["vtk"].vtkMatrix4x4.from_array(array)


def window_of(array, percentile):
    a = np.abs(array[np.isfinite(array) & (array != 0)].astype(np.float64))
    m = float(np.percentile(a, percentile))
    return (-m, m) if array.min() < 0 else (0.0, m)


# -- the module file -----------------------------------------------------------------------------------
def test_module_registers_and_checks_the_slicer_version(env):
    slicer, m = env.slicer, env.module
    parent = SimpleNamespace(path=str(MODULE_PATH))
    m.MedViTExplain(parent)
    assert parent.title == "MedViT Explain" and parent.categories == ["Informatics"]
    assert "5.2 or newer" in parent.helpText and parent.icon.path.endswith("MedViTExplain.png")
    assert "MedViTExplain" in slicer.selfTests
    assert m.versionProblem() is None  # the fake app is 5.8

    slicer.reset(env.temp, version=(5, 0))
    widget = env.module.MedViTExplainWidget(slicer.qMRMLWidget())
    widget.setup()
    assert "needs 3D Slicer 5.2 or newer; this is 5.0" in widget.ui.statusLabel.text
    assert not widget.ui.applyButton.enabled
    assert m.MedViTExplainLogic().unavailableReason().startswith("MedViT Explain needs 3D Slicer 5.2")


def test_lists_come_from_the_cli_and_the_model_and_settings_persist(env):
    from medvit_explain.registry import method_names
    from medvit_explain.viewer_logic import model_targets

    slicer = env.slicer
    widget = make_widget(env)
    ui = widget.ui
    assert [ui.methodsList.item(i).text() for i in range(ui.methodsList.count)] == method_names()
    assert "Brocki" in ui.methodsList.item(0).toolTip()
    assert widget._selected(ui.methodsList) == ["cdam"]
    assert [ui.targetsList.item(i).text() for i in range(ui.targetsList.count)] == [t["name"] for t in model_targets()]
    assert widget._selected(ui.targetsList) == ["malignancy"]
    assert ui.setupLabel.text == "Runs: " + " ".join(widget.logic.cliCommand())

    # choices go to the parameter node and come back in a new panel
    ui.methodsList.item(method_names().index("agcam")).setSelected(True)
    ui.deviceComboBox.currentText = "cpu"
    ui.percentileSlider.value = 97.5
    ui.reportCheckBox.checked = False
    node = widget.logic.getParameterNode()
    assert node.GetParameter("Methods") == "cdam,agcam" and node.GetParameter("Device") == "cpu"
    assert node.GetParameter("Percentile") == "97.5" and node.GetParameter("Report") == "false"
    again = make_widget(env)
    assert again._selected(again.ui.methodsList) == ["cdam", "agcam"]
    assert again.ui.deviceComboBox.currentText == "cpu" and again.ui.percentileSlider.value == 97.5
    assert not again.ui.reportCheckBox.checked

    # a model whose config names its task instead of listing it: every target is explained
    ckpt = env.tmp / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"task_spec": "lidc"}))
    ui.modelPathLineEdit.currentPath = str(ckpt)
    assert ui.targetsList.count == 0 and "all are explained" in ui.targetsList.toolTip
    assert slicer.util.messages == []


def test_a_wrong_executable_setting_says_what_to_fix(env):
    widget = make_widget(env)
    ui = widget.ui
    ui.executablePathLineEdit.currentPath = str(env.tmp / "nope" / "medvit-explain")
    assert env.module.MedViTExplainLogic().executableSetting().endswith("nope/medvit-explain")
    assert ui.setupLabel.text.startswith("The medvit-explain executable in Settings is not usable: expected an")
    assert ui.statusLabel.text == ui.setupLabel.text and ui.methodsList.count == 0 and not ui.applyButton.enabled
    ui.executablePathLineEdit.currentPath = EXECUTABLE  # back: the list is read again (from the cache)
    assert widget.methodQuery is None and ui.methodsList.count > 0  # (Apply waits for a CT)
    assert ui.setupLabel.text.startswith("Runs: ")


def test_a_scenes_parameters_fill_the_panel_and_are_not_overwritten(env):
    ckpt = env.tmp / "ckpt"
    ckpt.mkdir()
    targets = [{"name": "a", "kind": "binary"}, {"name": "b", "kind": "regression"}]
    (ckpt / "config.json").write_text(json.dumps({"task_spec": {"targets": targets}}))
    logic = env.module.MedViTExplainLogic()
    node = logic.getParameterNode()  # as a loaded scene brings it
    logic.setDefaultParameters(node)
    for name, value in {"Model": str(ckpt), "Targets": "b", "Device": "cpu", "Percentile": "95"}.items():
        node.SetParameter(name, value)
    widget = make_widget(env)
    ui = widget.ui
    assert ui.modelPathLineEdit.currentPath == str(ckpt) and ui.deviceComboBox.currentText == "cpu"
    assert [ui.targetsList.item(i).text() for i in range(ui.targetsList.count)] == ["a", "b"]
    assert widget._selected(ui.targetsList) == ["b"] and ui.percentileSlider.value == 95.0
    assert [node.GetParameter(k) for k in ("Model", "Targets", "Device", "Percentile")] == [
        str(ckpt),
        "b",
        "cpu",
        "95",
    ]


def test_apply_runs_in_the_background_and_shows_the_maps_safely(env):
    slicer, m = env.slicer, env.module
    ct, study = load_ct_in_study(slicer, env.ct.path)
    storage_id, storage_file = ct.GetStorageNodeID(), ct.GetStorageNode().GetFileName()
    widget = make_widget(env)
    ui = widget.ui
    assert ui.inputSelector.currentNode() is ct  # the first CT of the scene
    ui.deviceComboBox.currentText = "cpu"
    ui.batchSizeSpinBox.value = 4
    seen = []
    show_progress = widget.onProgress
    widget.onProgress = lambda p: (seen.append((p, widget.run.runner.proc.poll())), show_progress(p))

    started = time.monotonic()
    ui.applyButton.click()
    assert time.monotonic() - started < 3.0  # Apply returns while the CLI runs
    run = widget.run
    assert run.running and run.runner.proc.poll() is None
    assert ui.cancelButton.enabled and not ui.applyButton.enabled
    assert ui.statusLabel.text == "Running medvit-explain on small_ct ..."
    run = finish(env, widget)
    assert run.state == "done", run.error

    # the CLI's tqdm bar fed the progress bar while the process was still running
    n = env.ct.slices
    explain = [p for p, _ in seen if p.label == "explain"]
    assert explain and explain[-1].done == n and all(p.total == n for p in explain)
    assert any(returncode is None for _, returncode in seen)
    assert (n, n) in ui.progressBar.history
    assert ui.progressBar.value == ui.progressBar.maximum
    assert ui.statusLabel.text.startswith("Done: 1 map(s) of small_ct. Highest malignancy probability")
    assert ui.applyButton.enabled and not ui.cancelButton.enabled

    # the map: on the CT's grid, the module's colour table, a percentile window, a legend, in the views
    result = widget.result
    ((key, map_node),) = result["maps"].items()
    assert key == ("cdam", "malignancy") and ui.mapSelector.currentNode() is map_node
    assert map_node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
    assert np.allclose(map_node._ijk_to_ras, ct._ijk_to_ras, atol=1e-4)
    array = slicer.util.arrayFromVolume(map_node)
    display = map_node.GetDisplayNode()
    lo, hi = window_of(array, 99.0)
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(lo) and display.GetWindowLevelMax() == pytest.approx(hi)
    assert hi < np.abs(array).max()  # not ± the maximum
    colors = display.GetColorNode()
    assert colors.GetAttribute(m.ROLE_ATTRIBUTE) == ("colors:signed" if lo < 0 else "colors:positive")
    alpha = [colors._colors[i][3] for i in range(colors.GetNumberOfColors())]
    if lo < 0:
        assert alpha[127] == alpha[128] == 0.0 and alpha[0] == alpha[255] == 1.0
        assert all(a >= b for a, b in zip(alpha[:128], alpha[1:128]))  # grows with |value|
        assert all(a <= b for a, b in zip(alpha[128:], alpha[129:]))
    legend = m.MedViTExplainLogic.colorLegend(map_node)
    assert legend is not None and legend.GetVisibility() and legend.GetTitleText() == "cdam malignancy"
    red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
    assert red.GetForegroundVolumeID() == map_node.GetID() and red.GetBackgroundVolumeID() == ct.GetID()
    assert red.GetForegroundOpacity() == pytest.approx(ui.opacitySlider.value)

    # the scores: a table in the table view, a chart in the plot view, the views at the top slice
    table, chart, series = result["table"], result["chart"], result["series"]
    assert table.GetNumberOfRows() == n == len(result["rows"]) and table.use_column_name_as_header
    assert slicer.app.layoutManager().layout == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView
    selection = slicer.app.applicationLogic().GetSelectionNode()
    assert selection.GetActiveTableID() == table.GetID() and selection.GetActivePlotChartID() == chart.GetID()
    assert series.GetTableNode() is table and (series.GetXColumnName(), series.GetYColumnName()) == (
        "source_index",
        "malignancy_prob",
    )
    assert chart.HasPlotSeriesNodeID(series.GetID())
    top = result["top"]
    assert top["malignancy_prob"] == max(r["malignancy_prob"] for r in result["rows"])
    red_slice = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
    assert red_slice.jumps[-1] == pytest.approx(widget.logic.rowPosition(ct, top))
    slicer.app.layoutManager().plotWidget(0).plotView().select(series.GetID(), [3])  # click a chart point
    assert red_slice.jumps[-1] == pytest.approx(widget.logic.rowPosition(ct, result["rows"][3]))
    ui.jumpTopButton.click()
    assert red_slice.jumps[-1] == pytest.approx(widget.logic.rowPosition(ct, top))

    # results in one folder under the CT's study
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    folder = result["folder"]
    assert sh.GetItemParent(folder) == study and sh.GetItemName(folder) == "MedViT Explain: small_ct"
    for node in (map_node, table, chart, series):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == folder

    # data safety: the CT's storage untouched; maps have no storage node (saving the scene writes them)
    assert ct.GetStorageNodeID() == storage_id and ct.GetStorageNode().GetFileName() == storage_file
    assert Path(storage_file).is_file() and ct._storable_modified == 0 and slicer.util.saved == []
    assert map_node.GetStorageNode() is None

    # temporary files: the exported CT is gone, the output stays for the report
    assert temp_folders(env) == [Path(run.workDir).name]
    assert not (Path(run.workDir) / "input").exists() and Path(result["outputDir"]).is_dir()
    ui.openReportButton.click()
    import qt

    assert qt.QDesktopServices.opened[-1].localFile == result["report"] and Path(result["report"]).is_file()

    # the display controls: window percentile and transparent band
    ui.percentileSlider.value = 90.0
    assert display.GetWindowLevelMax() == pytest.approx(window_of(array, 90.0)[1])
    ui.transparentSlider.value = 30.0
    if lo < 0:
        alpha = [colors._colors[i][3] for i in range(256)]
        assert alpha[128 + 30] == 0.0 and alpha[128 + 45] > 0.0  # |t| < 0.3 is transparent now
    node = widget.logic.getParameterNode()
    assert node.GetParameter("Percentile") == "90" and node.GetParameter("TransparentPercent") == "30"

    # closing the scene removes the temporary folders
    slicer.mrmlScene.Clear()
    assert temp_folders(env) == []
    assert ui.statusLabel.text == "" and widget.result is None


def test_second_apply_replaces_the_nodes_and_roi_points_become_lps_centres(env):
    slicer = env.slicer
    ct, _study = load_ct_in_study(slicer, env.ct.path)
    widget = make_widget(env)
    ui = widget.ui
    ui.deviceComboBox.currentText = "cpu"
    ui.reportCheckBox.checked = False
    ui.applyButton.click()
    first = finish(env, widget)
    assert first.state == "done", first.error
    assert first.result["report"] is None and "--no-report" in first.command
    before = {k: first.result[k] for k in ("table", "chart", "series")}
    map_before = first.result["maps"][("cdam", "malignancy")]

    # one point per nodule (RAS in Slicer) → --roi-centers CSV in LPS mm
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodules")
    for x, y, z in env.ct.centres_lps:
        points.AddControlPoint(-x, -y, z)
    ui.roiSelector.setCurrentNode(points)
    assert widget.logic.getParameterNode().GetNodeReference("RoiNode") is points
    ui.applyButton.click()
    second = finish(env, widget)
    assert second.state == "done", second.error
    assert "--roi-centers" in second.command

    # the nodes of the first run are reused, none added
    result = second.result
    assert result["maps"][("cdam", "malignancy")] is map_before
    assert all(result[k] is node for k, node in before.items())
    logic = widget.logic
    assert logic.mapNodes(ct) == [map_before]
    for role, cls in (("scores", "vtkMRMLTableNode"), ("chart", "vtkMRMLPlotChartNode")):
        assert len(logic.resultNodes(ct, role, cls)) == 1
    assert len(slicer.util.getNodesByClass("vtkMRMLColorLegendDisplayNode")) == 1
    assert len(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")) == 2  # the CT and one map

    # the CLI read the points as LPS centres: it echoes them in predictions.csv
    centres = sorted({(r["center_x_mm"], r["center_y_mm"], r["center_z_mm"]) for r in result["rows"]})
    assert np.allclose(centres, sorted(map(tuple, env.ct.centres_lps)), atol=1e-3)
    assert result["series"].GetXColumnName() == "roi" and result["top"]["view"] == "mean"
    assert ui.statusLabel.text.endswith(f"on ROI {result['top']['roi']}.")

    # the first run's folder is gone, the second's exported CT and CSV too
    assert temp_folders(env) == [Path(second.workDir).name]
    assert not (Path(second.workDir) / "input").exists()
    widget.cleanup()  # Slicer exits
    assert temp_folders(env) == []


@pytest.mark.skipif(not (POSIX and Path("/proc").is_dir()), reason="the process-group check reads /proc (Linux)")
def test_cancel_ends_the_process_tree_and_leaves_no_output(env):
    slicer, m = env.slicer, env.module
    load_ct_in_study(slicer, env.ct.path)
    # a launcher that runs the CLI as its child (as PythonSlicer does): ending the launcher alone is not enough
    wrapper = env.tmp / "launcher.sh"
    wrapper.write_text("#!/bin/sh\n" + " ".join(f"'{a}'" for a in CLI) + ' "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    import qt

    qt.QSettings().setValue(m.EXECUTABLE_SETTING, str(wrapper))
    kept = env.tmp / "kept"
    widget = make_widget(env)
    ui = widget.ui
    ui.outputFolderLineEdit.currentPath = str(kept)
    ui.deviceComboBox.currentText = "cpu"
    ui.applyButton.click()
    run = widget.run
    pgid = run.runner.proc.pid
    wait_for(slicer, lambda: len(live_group_members(pgid)) >= 2, 30)  # the launcher and its Python
    assert Path(run.outputDir).parent == kept and Path(run.outputDir).is_dir()

    ui.cancelButton.click()
    assert run.state == "cancelled" and widget.run is None
    deadline = time.monotonic() + 10
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_group_members(pgid) == [] and run.runner.proc.poll() is not None
    assert not Path(run.outputDir).exists() and list(kept.iterdir()) == []
    assert temp_folders(env) == []
    assert widget.logic.mapNodes(ui.inputSelector.currentNode()) == []
    assert ui.statusLabel.text == "Cancelled; its output was removed." and ui.progressBar.value == 0
    assert ui.applyButton.enabled and not ui.cancelButton.enabled


def test_a_failing_run_reports_the_cli_error_and_resets(env):
    slicer, m = env.slicer, env.module
    load_ct_in_study(slicer, env.ct.path)
    widget = make_widget(env)
    failing = env.tmp / "failing-cli"
    failing.write_text(
        "#!/bin/sh\n"
        'printf "explain:  50%%|#    | 1/2 [00:00<00:00]\\r" >&2\n'
        'echo "error: checkpoint not found: /nowhere (expected a folder with config.json)" >&2\n'
        "exit 2\n"
    )
    failing.chmod(0o755)
    import qt

    qt.QSettings().setValue(m.EXECUTABLE_SETTING, str(failing))
    widget.logic._helpers = None
    widget.ui.applyButton.click()
    run = finish(env, widget, 30)
    assert run.state == "failed"
    message = "checkpoint not found: /nowhere (expected a folder with config.json)"
    assert run.error == message and widget.ui.statusLabel.text == "Failed: " + message
    kind, text, options = slicer.util.messages[-1]
    assert kind == "error" and text == "medvit-explain failed: " + message and "1/2" in options["detailedText"]
    assert widget.ui.applyButton.enabled and not widget.ui.cancelButton.enabled and widget.ui.progressBar.value == 0
    assert temp_folders(env) == [] and widget.logic.activeRun is None


def test_a_ct_under_a_transform_is_refused_or_hardened(env):
    slicer, m = env.slicer, env.module
    ct, _ = load_ct_in_study(slicer, env.ct.path)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 2.5)
    transform.SetMatrixTransformToParent(matrix(shift))
    ct.SetAndObserveTransformNodeID(transform.GetID())
    before = ct._ijk_to_ras.copy()
    logic = m.MedViTExplainLogic()
    with pytest.raises(m.TransformError, match="under the transform 'registration'.*Harden the transform"):
        logic.startExplain(ct)
    assert temp_folders(env) == []

    widget = make_widget(env)
    slicer.util.answers.append(False)  # "Harden the transform now?" → No
    widget.ui.applyButton.click()
    assert widget.run is None and widget.logic.activeRun is None
    assert "Harden the transform now?" in slicer.util.questions[-1]
    assert widget.ui.statusLabel.text.startswith("Not run: 'small_ct' is under the transform 'registration'")
    assert ct.GetParentTransformNode() is transform

    started = []
    widget.logic.startExplain = lambda node, **kw: started.append(node)  # the run itself is tested above
    slicer.util.answers.append(True)  # → Yes
    widget.ui.applyButton.click()
    assert started == [ct] and ct.GetParentTransformNode() is None
    assert np.allclose(ct._ijk_to_ras, shift @ before)


def test_roi_inputs_markup_points_to_lps_csv_and_segments_to_a_mask(env):
    import SimpleITK as sitk

    from medvit_explain.commands.roi import read_roi_centers

    slicer, m = env.slicer, env.module
    ct, _ = load_ct_in_study(slicer, env.ct.path)
    logic = m.MedViTExplainLogic()
    folder = env.tmp / "roi"
    folder.mkdir()

    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodules")
    points.AddControlPoint(10.0, -20.0, -30.0)
    points.AddControlPoint([-1.5, 2.5, -40.0])
    lifted = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    lift = np.eye(4)
    lift[2, 3] = 5.0
    lifted.SetMatrixTransformToParent(matrix(lift))
    points.SetAndObserveTransformNodeID(lifted.GetID())  # world positions count
    options = logic.writeRoiInput(points, ct, str(folder))
    assert list(options) == ["roi_centers"]
    with open(options["roi_centers"], newline="") as stream:
        assert next(csv.reader(stream)) == ["x_mm", "y_mm", "z_mm"]
    assert np.allclose(read_roi_centers(options["roi_centers"]), [[-10.0, 20.0, -25.0], [1.5, -2.5, -35.0]])
    command = logic.helpers().explain_command(logic.cliCommand(), "ct.nrrd", "out", **options)
    assert command[command.index("--roi-centers") + 1] == options["roi_centers"]

    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "none")
    with pytest.raises(m.MedViTExplainError, match="has no points"):
        logic.writeRoiInput(empty, ct, str(folder))

    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodule segments")
    shape = slicer.util.arrayFromVolume(ct).shape
    for center in ((5, 60, 40), (4, 100, 120)):
        mask = np.zeros(shape, bool)
        k, j, i = center
        mask[k - 1 : k + 2, j - 3 : j + 4, i - 3 : i + 4] = True
        segmentation.add_segment(f"nodule {center}", mask, ct._ijk_to_ras)
    options = logic.writeRoiInput(segmentation, ct, str(folder))
    labels = sitk.ReadImage(options["roi_mask"])
    original = sitk.ReadImage(str(env.ct.path))
    assert sorted(np.unique(sitk.GetArrayFromImage(labels))) == [0, 1, 2]
    assert labels.GetSize() == original.GetSize() and np.allclose(labels.GetOrigin(), original.GetOrigin())
    assert np.allclose(labels.GetSpacing(), original.GetSpacing())
    assert slicer.util.getNodesByClass("vtkMRMLLabelMapVolumeNode") == []  # the temporary labelmap is gone


def test_self_test_skips_cleanly_without_medvit_explain(env, monkeypatch):
    slicer, m = env.slicer, env.module
    import qt

    qt.QSettings().setValue(m.EXECUTABLE_SETTING, "")
    monkeypatch.setattr(m.MedViTExplainLogic, "installedInSlicer", staticmethod(lambda: False))
    reason = m.MedViTExplainLogic().unavailableReason()
    assert reason == m.NOT_AVAILABLE

    m.MedViTExplainTest().runTest()  # what "Reload and Test" calls: no exception, a message
    kind, text, _ = slicer.util.messages[-1]
    assert kind == "delay" and text == "MedViTExplain self-test skipped: " + reason

    outcome = unittest.TextTestRunner(stream=open(os.devnull, "w")).run(m.MedViTExplainTest("test_ExplainSample"))
    assert outcome.wasSuccessful() and [why for _, why in outcome.skipped] == [reason]

    widget = env.module.MedViTExplainWidget(slicer.qMRMLWidget())
    widget.setup()
    assert widget.ui.statusLabel.text == reason == widget.ui.setupLabel.text
    assert widget.ui.methodsList.count == 0 and not widget.ui.applyButton.enabled


def test_self_test_passes_with_medvit_explain_installed_in_slicers_python(env):
    """Way (b): no executable set, the package importable in "Slicer's" Python (here this venv's):
    ``PythonSlicer -m medvit_explain`` (this interpreter where there is no PythonSlicer)."""
    slicer, m = env.slicer, env.module
    import qt

    qt.QSettings().setValue(m.EXECUTABLE_SETTING, "")
    logic = m.MedViTExplainLogic()
    assert logic.installedInSlicer()
    assert logic.cliCommand() == [shutil.which("PythonSlicer") or sys.executable, "-m", "medvit_explain"]
    m.MedViTExplainTest().runTest()
    assert slicer.util.messages[-1][:2] == ("delay", "Test passed")
    assert temp_folders(env) == []


# -- installing into Slicer's Python (path b) ------------------------------------------------------------
class FakeTorchLogic:
    installed = False
    calls: list = []

    def torchInstalled(self):
        return self.installed

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
        FakeTorchLogic.calls.append((askConfirmation, torchVersionRequirement))
        return SimpleNamespace(__version__="2.5.0")


def test_install_into_slicer_uses_the_pytorch_extension_and_keeps_slicers_simpleitk(env, monkeypatch):
    slicer, m = env.slicer, env.module
    monkeypatch.setattr(m.MedViTExplainLogic, "_methodRows", {})  # an install forgets the method list
    logic = m.MedViTExplainLogic()

    logic.pythonVersion = (3, 9)  # Slicer 5.0 - 5.8
    with pytest.raises(m.InstallError, match=r"Python is 3\.9; medvit-explain needs Python 3\.10.*existing"):
        logic.installIntoSlicer()

    logic.pythonVersion = (3, 12)  # Slicer 5.10+
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension is not installed
    with pytest.raises(m.InstallError, match="needs the PyTorch extension.*Extensions Manager"):
        logic.installIntoSlicer()
    assert slicer.util.pip_calls == []

    FakeTorchLogic.calls = []
    monkeypatch.setitem(sys.modules, "PyTorchUtils", SimpleNamespace(PyTorchUtilsLogic=FakeTorchLogic))
    wanted = logic.installIntoSlicer(requirement="/wheels/medvit_explain-0.1.0-py3-none-any.whl")
    assert FakeTorchLogic.calls == [(False, ">=2.1")]
    assert slicer.util.pip_calls[0] == ["/wheels/medvit_explain-0.1.0-py3-none-any.whl", "--no-deps"]
    assert slicer.util.pip_calls[1] == wanted
    names = {w.split(">")[0].split("=")[0].split("<")[0].split(";")[0].strip().lower() for w in wanted}
    assert "torch" not in names and "simpleitk" not in names and {"timm", "numpy", "click"} <= names
    assert not any("pytest" in w for w in wanted)  # no extras

    slicer.util.pip_error.append(RuntimeError("pip exited with code 1"))
    with pytest.raises(m.InstallError, match="pip install .* failed: pip exited with code 1"):
        logic.installIntoSlicer()


def test_install_button_shows_a_dialog_on_failure_and_is_off_on_python_39(env, monkeypatch):
    slicer = env.slicer
    widget = make_widget(env)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    widget.logic.pythonVersion = (3, 12)
    widget.ui.installButton.enabled = True
    widget.ui.installButton.click()
    kind, text, _ = slicer.util.messages[-1]
    assert kind == "error" and text.startswith("Installing medvit-explain failed.") and "PyTorch extension" in text
    assert widget.ui.statusLabel.text.startswith("Installation failed:")

    widget.logic.pythonVersion = (3, 9)
    widget.checkSetup()
    assert not widget.ui.installButton.enabled and "3D Slicer 5.10 or newer" in widget.ui.installButton.toolTip


def test_dependency_requirements_skip_torch_simpleitk_and_extras(env):
    m = env.module
    requires = [
        "torch>=2.1",
        "SimpleITK>=2.3",
        "timm>=1.0",
        'pytest>=8; extra == "dev"',
        'tomli; python_version < "3.11"',
    ]
    assert m.dependencyRequirements(requires) == ["timm>=1.0", 'tomli; python_version < "3.11"']


# -- finding an existing medvit-explain (path a) ---------------------------------------------------------
@pytest.mark.skipif(not VENV_CLI.is_file(), reason="needs the checkout's .venv")
def test_locate_package_source_of_an_existing_environment(env, tmp_path):
    m = env.module
    package = ROOT / "medvit_explain"
    venv = ROOT / ".venv"
    for path in (venv / "bin" / "medvit-explain", venv / "bin" / "python", venv, ROOT):
        assert Path(m.locatePackageSource(str(path))).resolve() == package.resolve(), path
    assert m.locatePackageSource(str(tmp_path)) is None
    assert m.locatePackageSource("") is None

    # a plain (non-editable) environment: lib/python3.X/site-packages/medvit_explain
    site = tmp_path / "env" / "lib" / "python3.9" / "site-packages"
    shutil.copytree(package, site / "medvit_explain", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (tmp_path / "env" / "bin").mkdir()
    assert Path(m.locatePackageSource(str(tmp_path / "env" / "bin" / "medvit-explain"))) == site / "medvit_explain"


def python39():
    for candidate in [shutil.which("python3.9"), *sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))]:
        if candidate:
            try:
                import subprocess

                if subprocess.run([str(candidate), "-c", "pass"], capture_output=True).returncode == 0:
                    return str(candidate)
            except OSError:
                continue
    return None


def test_viewer_logic_loads_from_the_package_source_without_torch(tmp_path):
    """What the module does on Slicer 5.2 - 5.8 (Python 3.9): load medvit_explain.viewer_logic from an
    environment's package folder, nothing else; run on Python 3.9 when one is installed."""
    import subprocess

    code = (
        "import importlib, importlib.util, os, sys\n"
        f"src = {str(ROOT / 'medvit_explain')!r}\n"
        "spec = importlib.util.spec_from_file_location('medvit_explain', os.path.join(src, '__init__.py'),"
        " submodule_search_locations=[src])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['medvit_explain'] = module\n"
        "spec.loader.exec_module(module)\n"
        "vl = importlib.import_module('medvit_explain.viewer_logic')\n"
        "assert vl.parse_progress('explain:  50%|#  | 2/4 [00:00]').label == 'explain'\n"
        "assert vl.model_targets()[0]['name'] == 'malignancy'\n"
        f"compile(open({str(MODULE_PATH)!r}).read(), 'MedViTExplain.py', 'exec')\n"
        "print(','.join(m for m in ('torch', 'numpy') if m in sys.modules), sys.version_info[:2])\n"
    )
    pythons = [sys.executable] + ([python39()] if python39() else [])
    for python in pythons:
        out = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(" ("), out.stdout  # neither torch nor numpy imported
    if len(pythons) == 1:
        pytest.skip("no Python 3.9 here: checked on this interpreter only")
