"""MedViT Explain: explain a Vision Transformer's CT prediction in 3D Slicer.

The module saves the selected CT to a temporary NRRD, runs ``medvit-explain explain`` (as
``PythonSlicer -m medvit_explain explain ...``, an argument list, never a shell string) and loads what it
writes: one signed map per method × target, shown in the foreground of the slice views with a
cold-to-hot (blue–red) colormap, a fixed window centred at 0 and an opacity slider; and the per-slice
scores, shown in a table with the slice of highest malignancy probability selected.

Torch never runs inside Slicer's process. Everything that does not need Slicer (building the
command, parsing progress and errors, finding the outputs, the colour window, the predictions) lives
in ``medvit_explain.viewer_logic`` and is tested in medvit-explain's own suite.
"""

import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PACKAGE = "medvit_explain"
PIP_REQUIREMENT_SETTING = "MedViTExplain/PipRequirement"  # e.g. a local wheel or "medvit-explain==0.1.0"
DEFAULT_PIP_REQUIREMENT = "medvit-explain"
MAP_ATTRIBUTE = "MedViTExplain.Map"
DEFAULT_TARGETS = [
    "malignancy",
    "subtlety",
    "calcification",
    "margin",
    "lobulation",
    "spiculation",
    "diameter",
    "texture",
    "sphericity",
]
# cold-to-hot colour tables, first available wins
COLOR_NODE_IDS = [
    "vtkMRMLColorTableNodeFileDivergingBlueRed.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodeRainbow",
]


#
# MedViTExplain
#
class MedViTExplain(ScriptedLoadableModule):
    """Module description (the ScriptedLoadableModule template)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedViT Explain"
        self.parent.categories = ["Informatics"]
        self.parent.dependencies = []
        self.parent.contributors = ["medvit-explain contributors"]
        self.parent.helpText = (
            "Explain a Vision Transformer's prediction (nodule malignancy and LIDC biomarkers) on a CT: "
            "class-discriminative attention maps (CDAM, AG-CAM and baselines) are shown as a colour "
            "overlay, with the per-slice scores in a table. The maps are raw signed values: red is "
            "evidence for the target, blue against it. Runs the medvit-explain command line in Slicer's "
            "Python (installed on first use)."
        )
        self.parent.acknowledgementText = (
            "CDAM: Brocki & Chung, arXiv:2312.02364 (2023). AG-CAM: Leem & Seo, AAAI 2024. "
            "The subprocess design follows the TotalSegmentator Slicer extension."
        )


#
# MedViTExplainWidget
#
class MedViTExplainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, Apply, progress, map selector, opacity and the scores table."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.rows = []
        self.columns = []

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedViTExplain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedViTExplainLogic()

        self.ui.mapSelector.addAttribute("vtkMRMLScalarVolumeNode", MAP_ATTRIBUTE, "1")
        self._fillList(self.ui.methodsList, self.logic.methodNames(), ["cdam"])
        self._fillList(self.ui.targetsList, DEFAULT_TARGETS, ["malignancy"])

        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.mapSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMapChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.scoresTable.connect("cellClicked(int,int)", self.onRowClicked)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneClosed)

        if not self.ui.inputSelector.currentNode():
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.GetAttribute(MAP_ATTRIBUTE):
                self.ui.inputSelector.setCurrentNode(first)
        self.updateButtons()

    def cleanup(self):
        self.removeObservers()

    def onSceneClosed(self, caller, event):
        self.rows, self.columns = [], []
        self.ui.scoresTable.clear()
        self.ui.scoresTable.setRowCount(0)
        self.ui.statusLabel.text = ""

    # -- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _fillList(listWidget, names, selected):
        listWidget.clear()
        for name in names:
            item = qt.QListWidgetItem(name)
            listWidget.addItem(item)
            item.setSelected(name in selected)

    @staticmethod
    def _selected(listWidget):
        return [listWidget.item(i).text() for i in range(listWidget.count) if listWidget.item(i).isSelected()]

    def updateButtons(self, *_):
        self.ui.applyButton.enabled = self.ui.inputSelector.currentNode() is not None

    def setStatus(self, text):
        self.ui.statusLabel.text = text
        slicer.app.processEvents()

    # -- running ------------------------------------------------------------------------------------
    def onApply(self):
        if not self.logic.ensureInstalled(confirm=True):
            self.setStatus("medvit-explain is not installed in Slicer's Python.")
            return
        self._fillList(self.ui.methodsList, self.logic.methodNames(), self._selected(self.ui.methodsList))
        methods = self._selected(self.ui.methodsList)
        targets = self._selected(self.ui.targetsList)
        if not methods or not targets:
            slicer.util.errorDisplay("Choose at least one method and one target.")
            return
        self.ui.applyButton.enabled = False
        self.ui.progressBar.value = 0
        self.setStatus("Running medvit-explain ...")

        def onProgress(progress):
            self.ui.progressBar.maximum = max(1, progress.total)
            self.ui.progressBar.value = progress.done
            slicer.app.processEvents()

        try:
            with slicer.util.tryWithErrorDisplay("medvit-explain failed.", waitCursor=True):
                outputs = self.logic.process(
                    self.ui.inputSelector.currentNode(),
                    model=self.ui.modelPathLineEdit.currentPath.strip() or None,
                    methods=methods,
                    targets=targets,
                    device=self.ui.deviceComboBox.currentText,
                    batchSize=int(self.ui.batchSizeSpinBox.value),
                    progressCallback=onProgress,
                )
                self.showOutputs(outputs)
        finally:
            self.updateButtons()

    def showOutputs(self, outputs):
        maps = outputs["maps"]
        first = next(iter(maps.values()), None)
        self.ui.mapSelector.setCurrentNode(first)
        if first is not None:
            self.logic.showOverlay(outputs["input"], first, self.ui.opacitySlider.value)
        self.columns, self.rows = outputs["columns"], outputs["rows"]
        self.fillScores()
        top = outputs["top"]
        if top is not None and "slice" in top:
            self.selectRow(self.rows.index(top))
            self.setStatus(
                f"Done: {len(maps)} map(s). Highest malignancy probability "
                f"{top.get('malignancy_prob', float('nan')):.3f} on slice {top['slice']}."
            )
        else:
            self.setStatus(f"Done: {len(maps)} map(s).")
        self.ui.progressBar.value = self.ui.progressBar.maximum

    def fillScores(self):
        table = self.ui.scoresTable
        table.clear()
        table.setColumnCount(len(self.columns))
        table.setRowCount(len(self.rows))
        table.setHorizontalHeaderLabels(self.columns)
        for r, row in enumerate(self.rows):
            for c, column in enumerate(self.columns):
                value = row.get(column)
                text = "" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()

    def selectRow(self, r):
        self.ui.scoresTable.selectRow(r)
        self.ui.scoresTable.scrollToItem(self.ui.scoresTable.item(r, 0))
        self.onRowClicked(r, 0)

    # -- display ------------------------------------------------------------------------------------
    def onRowClicked(self, r, _column):
        inputNode = self.ui.inputSelector.currentNode()
        if inputNode is not None and 0 <= r < len(self.rows):
            self.logic.jumpToRow(inputNode, self.rows[r])

    def onMapChanged(self, node):
        if node is not None and self.ui.inputSelector.currentNode() is not None:
            self.logic.showOverlay(self.ui.inputSelector.currentNode(), node, self.ui.opacitySlider.value)

    def onOpacityChanged(self, value):
        slicer.util.setSliceViewerLayers(foregroundOpacity=value)


#
# MedViTExplainLogic
#
class MedViTExplainLogic(ScriptedLoadableModuleLogic):
    """Runs the medvit-explain CLI on a volume node and loads its outputs (no GUI dependency)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = logging.info

    # -- installation -------------------------------------------------------------------------------
    @staticmethod
    def isInstalled():
        return importlib.util.find_spec(PACKAGE) is not None

    def ensureInstalled(self, confirm=True):
        """Offer to ``pip_install`` medvit-explain into Slicer's Python when it is missing."""
        if self.isInstalled():
            return True
        requirement = str(qt.QSettings().value(PIP_REQUIREMENT_SETTING, DEFAULT_PIP_REQUIREMENT))
        if confirm and not slicer.util.confirmOkCancelDisplay(
            f"This module needs the '{requirement}' Python package (with PyTorch, several hundred MB), "
            "which is not installed in Slicer's Python. Install it now?",
            "Missing Python package",
        ):
            return False
        slicer.util.pip_install(requirement)
        importlib.invalidate_caches()
        return self.isInstalled()

    @staticmethod
    def helpers():
        """``medvit_explain.viewer_logic`` (import-light: no torch)."""
        return importlib.import_module(PACKAGE + ".viewer_logic")

    def methodNames(self):
        """The registered methods (plugins included), from ``medvit-explain list-methods --json`` run by
        Slicer's Python; none before the package is installed (the Apply button offers to install it)."""
        if not self.isInstalled():
            return []
        return self.helpers().known_methods(self.pythonExecutable())

    @staticmethod
    def pythonExecutable():
        """Slicer's own Python launcher (runs with Slicer's site-packages)."""
        return shutil.which("PythonSlicer") or shutil.which("PythonSlicer.exe") or sys.executable

    # -- running ------------------------------------------------------------------------------------
    def process(
        self,
        inputVolume,
        model=None,
        methods=("cdam",),
        targets=("malignancy",),
        device="auto",
        batchSize=None,
        mapDtype="int16",
        outputDir=None,
        progressCallback=None,
        showResult=True,
    ):
        """Explain ``inputVolume``; returns ``{"input", "maps": {(method, target): node}, "columns",
        "rows", "top", "table", "outputDir"}``. Raises RuntimeError with the CLI's one-line message."""
        if inputVolume is None:
            raise ValueError("expected an input volume, got none")
        helpers = self.helpers()
        workDir = tempfile.mkdtemp(prefix="MedViTExplain-")
        inputPath = os.path.join(workDir, "input.nrrd")
        if not slicer.util.saveNode(inputVolume, inputPath, {"useCompression": 0}):
            raise RuntimeError(f"could not save {inputVolume.GetName()} to {inputPath}")
        outputDir = outputDir or os.path.join(workDir, "out")
        cmd = helpers.build_explain_command(
            self.pythonExecutable(),
            inputPath,
            outputDir,
            model=model,
            methods=list(methods),
            targets=list(targets),
            device=device,
            batch_size=batchSize,
            map_dtype=mapDtype,
        )
        logging.info("MedViTExplain: running %s", cmd)

        def onLine(line):
            self.logCallback(line)
            slicer.app.processEvents()

        def onProgress(progress):
            if progressCallback:
                progressCallback(progress)
            slicer.app.processEvents()

        try:
            helpers.run_command(cmd, on_line=onLine, on_progress=onProgress)
        except helpers.ExplainCommandError as exc:
            raise RuntimeError(str(exc)) from None
        finally:
            if os.path.exists(inputPath):
                os.remove(inputPath)

        stem = helpers.volume_stem(inputPath)
        found = helpers.find_outputs(outputDir, stem, methods=self.methodNames(), targets=list(targets))
        if not found:
            raise RuntimeError(f"medvit-explain wrote no maps into {outputDir}")
        maps = {}
        for (method, target), path in found.items():
            node = slicer.util.loadVolume(
                str(path), {"name": f"{inputVolume.GetName()} {method}/{target}", "show": False}
            )
            node.SetAttribute(MAP_ATTRIBUTE, "1")
            node.SetAttribute(MAP_ATTRIBUTE + ".method", method)
            node.SetAttribute(MAP_ATTRIBUTE + ".target", target)
            self.setMapDisplay(node)
            maps[(method, target)] = node
        columns, rows = helpers.parse_predictions(os.path.join(outputDir, "predictions.csv"))
        table = self.scoresTableNode(f"{inputVolume.GetName()} scores", columns, rows)
        top = helpers.top_slice(rows)
        if showResult and maps:
            self.showOverlay(inputVolume, next(iter(maps.values())))
            if top is not None:
                self.jumpToRow(inputVolume, top)
        return {
            "input": inputVolume,
            "maps": maps,
            "columns": columns,
            "rows": rows,
            "top": top,
            "table": table,
            "outputDir": outputDir,
        }

    # -- display ------------------------------------------------------------------------------------
    def setMapDisplay(self, mapNode):
        """Cold-to-hot colormap and a fixed window symmetric around 0 (no auto window-level)."""
        helpers = self.helpers()
        mapNode.CreateDefaultDisplayNodes()
        display = mapNode.GetDisplayNode()
        for colorId in COLOR_NODE_IDS:
            if slicer.mrmlScene.GetNodeByID(colorId) is not None:
                display.SetAndObserveColorNodeID(colorId)
                break
        lo, hi = helpers.color_range(mapNode.GetImageData().GetScalarRange())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(lo, hi)
        display.SetApplyThreshold(False)
        display.SetInterpolate(True)

    @staticmethod
    def showOverlay(ctNode, mapNode, opacity=None):
        if opacity is None:
            opacity = MedViTExplainLogic.helpers().DEFAULT_OPACITY
        slicer.util.setSliceViewerLayers(background=ctNode, foreground=mapNode, foregroundOpacity=opacity, fit=False)

    @staticmethod
    def sliceAxis(volumeNode):
        """The IJK axis closest to the patient's superior direction (the axial slicing axis)."""
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        return max(range(3), key=lambda c: abs(ijkToRas.GetElement(2, c)))

    def jumpToRow(self, volumeNode, row):
        """Centre the slice views on the row's slice (``source_index`` along the slicing axis)."""
        if row is None or row.get("source_index") is None:
            return
        dims = volumeNode.GetImageData().GetDimensions()
        ijk = [(d - 1) / 2.0 for d in dims]
        ijk[self.sliceAxis(volumeNode)] = float(row["source_index"])
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        ras = ijkToRas.MultiplyPoint([*ijk, 1.0])[:3]
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            sliceNode.JumpSliceByOffsetting(*ras)

    @staticmethod
    def scoresTableNode(name, columns, rows):
        """A vtkMRMLTableNode with the per-slice scores (saved with the scene)."""
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", slicer.mrmlScene.GenerateUniqueName(name))
        table = node.GetTable()
        for column in columns:
            values = [row.get(column) for row in rows]
            numeric = all(v is None or isinstance(v, (int, float)) for v in values)
            array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
            array.SetName(column)
            for v in values:
                if numeric:
                    array.InsertNextValue(float("nan") if v is None else float(v))
                else:
                    array.InsertNextValue("" if v is None else str(v))
            table.AddColumn(array)
        node.Modified()
        return node


#
# MedViTExplainTest
#
class MedViTExplainTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: explains the bundled sample and checks the overlay's geometry."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ExplainSampleGeometry()

    def test_ExplainSampleGeometry(self):
        logic = MedViTExplainLogic()
        if not logic.isInstalled():
            self.skipTest("medvit-explain is not installed in Slicer's Python (press Apply once to install it)")
        helpers = logic.helpers()
        samplePath = helpers.bundled_sample_ct()
        if samplePath is None:  # no sample shipped: make a small phantom with the CLI
            workDir = tempfile.mkdtemp(prefix="MedViTExplainTest-")
            helpers.run_command(
                [
                    logic.pythonExecutable(),
                    "-m",
                    PACKAGE,
                    "make-phantom",
                    workDir,
                    "--seed",
                    "0",
                    "--size",
                    "64",
                    "64",
                    "24",
                ]
            )
            samplePath = os.path.join(workDir, "phantom_000.nii.gz")
        self.delayDisplay(f"Loading {samplePath}")
        ctNode = slicer.util.loadVolume(str(samplePath))
        self.assertIsNotNone(ctNode)

        self.delayDisplay("Explaining (cdam, malignancy) on the CPU")
        outputs = logic.process(ctNode, methods=["cdam"], targets=["malignancy"], device="cpu", batchSize=8)
        self.assertEqual(list(outputs["maps"]), [("cdam", "malignancy")])
        mapNode = outputs["maps"][("cdam", "malignancy")]

        # the overlay sits on the CT's voxel grid exactly
        self.assertEqual(mapNode.GetImageData().GetDimensions(), ctNode.GetImageData().GetDimensions())
        ctMatrix, mapMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        ctNode.GetIJKToRASMatrix(ctMatrix)
        mapNode.GetIJKToRASMatrix(mapMatrix)
        for r in range(4):
            for c in range(4):
                self.assertAlmostEqual(mapMatrix.GetElement(r, c), ctMatrix.GetElement(r, c), places=4)

        # shown in the foreground with a fixed window centred at 0
        display = mapNode.GetDisplayNode()
        self.assertFalse(display.GetAutoWindowLevel())
        self.assertAlmostEqual(display.GetWindowLevelMin(), -display.GetWindowLevelMax(), places=6)
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(composite.GetForegroundVolumeID(), mapNode.GetID())
        self.assertEqual(composite.GetBackgroundVolumeID(), ctNode.GetID())

        # one score row per slice, and the top slice is the highest malignancy probability
        dims = ctNode.GetImageData().GetDimensions()
        self.assertEqual(len(outputs["rows"]), dims[logic.sliceAxis(ctNode)])
        best = max(row["malignancy_prob"] for row in outputs["rows"])
        self.assertEqual(outputs["top"]["malignancy_prob"], best)
        self.assertEqual(outputs["table"].GetNumberOfRows(), len(outputs["rows"]))
        self.delayDisplay("Test passed")
