"""MedViT Explain: explain a Vision Transformer's CT prediction in 3D Slicer.

Supported: 3D Slicer 5.2 or newer (checked when the module loads). The module finds the medvit-explain
command line in one of two ways:

(a) **an existing medvit-explain executable** (*Settings → medvit-explain*: the ``.venv`` of a checkout,
    a virtual or conda environment, its ``bin/medvit-explain`` or its ``python``). Nothing is installed
    into Slicer; the only way on Slicer 5.2–5.8, whose Python 3.9 is older than medvit-explain's 3.10.
    The module reads the few standard-library files it needs (``medvit_explain.viewer_logic``) from that
    environment's package, nothing else of it.
(b) **installed into Slicer's Python** (Slicer 5.10 or newer, Python 3.12): PyTorch comes from the PyTorch
    extension (``PyTorchUtils``, a build that fits the GPU driver, as SlicerTotalSegmentator does), then
    medvit-explain and its requirements except torch and SimpleITK (Slicer's SimpleITK carries Slicer's
    own IO and must not be replaced). A failure says what failed and what to do, in a dialog.

PyTorch never runs in Slicer's process. The Logic has no GUI (the tests drive it):

* the CT is exported through a throw-away storage node: the CT's own storage node, file name and
  "modified" state are never touched;
* the CLI runs as a subprocess in its own process group (``start_new_session``; on Windows a new process
  group and a hidden console), started like ``slicer.util.launchConsoleProcess`` (Slicer's startup
  environment, stdout and stderr merged). A thread reads its output and a ``qt.QTimer`` hands it to
  Slicer, so Slicer stays responsive and tqdm's progress feeds the progress bar. *Cancel* ends the whole
  process group (``PythonSlicer`` is a launcher: ending it alone would leave Python running, and
  ``launchConsoleProcess`` starts the process in Slicer's own group, which cannot be ended as a whole)
  and removes the partial output;
* maps are read through a throw-away storage node too (no storage node points into a temporary folder,
  so saving the scene writes them), into the nodes of the previous run of the same CT (replaced, not
  added), in a folder under the CT's study in the subject hierarchy; with the scores table and chart;
* temporary folders are removed: the exported CT (and ROI inputs) as soon as the CLI ends, a run's output
  when the next run of the same CT replaces it or the scene closes or Slicer exits; everything at once on
  Cancel or failure. An *Output folder* keeps the outputs instead (never removed by the module);
* a CT under a transform is refused with a message (the CLI reads the untransformed voxels, so the overlay
  would be misplaced); the widget offers to harden the transform first;
* display: a colour table with a transparent centre (|value| below a fraction of the window is not drawn;
  blue → light blue against the target, red → yellow for it), a window from a percentile of the map's
  non-zero |value|s (not ± its maximum), positive-only for a non-negative map (AG-CAM), a colour legend,
  the per-slice malignancy probability as a chart (click a point to go to its slice) and the scores in
  Slicer's table view.

Everything that does not need Slicer (the command line, progress and errors, the method list, a model's
targets, the ROI CSV, the window and the colours) lives in ``medvit_explain.viewer_logic`` and is tested
in medvit-explain's suite; ``tests/test_slicer_module.py`` runs this file against stand-in ``slicer``,
``qt``, ``vtk`` and ``ctk`` modules with the real CLI. This file must stay Python 3.9 syntax.
"""

import glob
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

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
DISTRIBUTION = "medvit-explain"
MIN_SLICER_VERSION = (5, 2)
MIN_INSTALL_PYTHON = (3, 10)  # medvit-explain's requires-python: Slicer 5.10+ (Python 3.12)
EXECUTABLE_SETTING = "MedViTExplain/Executable"
REQUIREMENT_SETTING = "MedViTExplain/PipRequirement"  # e.g. a local wheel or "medvit-explain==0.1.0"
DEFAULT_REQUIREMENT = "medvit-explain"
TORCH_REQUIREMENT = ">=2.1"
SKIPPED_REQUIREMENTS = ("torch", "simpleitk")  # the PyTorch extension installs torch; Slicer has its SimpleITK
INPUT_ATTRIBUTE = "MedViTExplain.Input"  # on result nodes and their folder: the CT node's ID
ROLE_ATTRIBUTE = "MedViTExplain.Role"  # map | scores | chart | series | colors:signed | colors:positive
MAP_ATTRIBUTE = "MedViTExplain.Map"
POLL_INTERVAL_MS = 100
TEMP_PREFIX = "MedViTExplain-"
NUMBER_OF_COLORS = 256
DEFAULT_PARAMETERS = {
    "Model": "",
    "Methods": "cdam",
    "Targets": "malignancy",
    "Device": "auto",
    "BatchSize": "16",
    "Opacity": "0.8",
    "Percentile": "99",
    "TransparentPercent": "10",
    "OutputFolder": "",
    "Report": "true",
}
NOT_AVAILABLE = (
    "medvit-explain is not set up: choose an existing medvit-explain executable in Settings (e.g. the .venv "
    "of a medvit-explain checkout), or press 'Install into Slicer's Python' (3D Slicer 5.10 or newer)."
)


class MedViTExplainError(RuntimeError):
    """A problem the user can fix; ``str(exc)`` says what and how."""


class TransformError(MedViTExplainError):
    """The CT is under a transform that the command line would ignore."""


class InstallError(MedViTExplainError):
    """Installing medvit-explain into Slicer's Python failed or is not possible here."""


#
# Versions, the package and processes (no GUI)
#
def slicerVersion():
    return (int(slicer.app.majorVersion), int(slicer.app.minorVersion))


def versionProblem():
    """None on a supported Slicer, else what is wrong."""
    major, minor = slicerVersion()
    if (major, minor) < MIN_SLICER_VERSION:
        return (
            f"MedViT Explain needs 3D Slicer {MIN_SLICER_VERSION[0]}.{MIN_SLICER_VERSION[1]} or newer; "
            f"this is {major}.{minor}."
        )
    return None


def installProblem(pythonVersion):
    """None when medvit-explain can be installed into this Python, else why not and what to do."""
    if tuple(pythonVersion) < MIN_INSTALL_PYTHON:
        return (
            f"Slicer's Python is {pythonVersion[0]}.{pythonVersion[1]}; medvit-explain needs Python "
            f"{MIN_INSTALL_PYTHON[0]}.{MIN_INSTALL_PYTHON[1]} or newer (3D Slicer 5.10 or newer). Use an existing "
            "medvit-explain executable instead (Settings → medvit-explain)."
        )
    return None


def dependencyRequirements(requires, skipped=SKIPPED_REQUIREMENTS):
    """medvit-explain's requirements to pip-install into Slicer: no extras, nothing in ``skipped``."""
    wanted = []
    for text in requires or []:
        requirement, _, marker = text.partition(";")
        if "extra" in marker:
            continue
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        if match is None or match.group(1).lower().replace("_", "-") in skipped:
            continue
        wanted.append(text.strip())
    return wanted


def _isPackage(folder):
    return os.path.isfile(os.path.join(folder, "__init__.py")) and os.path.isfile(
        os.path.join(folder, "viewer_logic.py")
    )


def _packageIn(folder):
    candidate = os.path.join(folder, PACKAGE)
    if _isPackage(candidate):
        return candidate
    sitePackages = glob.glob(os.path.join(folder, "lib", "python3*", "site-packages"))
    sitePackages.append(os.path.join(folder, "Lib", "site-packages"))
    for site in sitePackages:
        candidate = os.path.join(site, PACKAGE)
        if _isPackage(candidate):
            return candidate
        # an editable install: a finder module maps the package to its source folder ...
        for finder in glob.glob(os.path.join(site, "__editable__*medvit_explain*finder.py")):
            match = re.search(r"['\"]medvit_explain['\"]\s*:\s*['\"]([^'\"]+)['\"]", _readText(finder))
            if match and _isPackage(match.group(1)):
                return match.group(1)
        # ... or a .pth file names the folder that holds it
        for pth in glob.glob(os.path.join(site, "*.pth")):
            for line in _readText(pth).splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "import")) and _isPackage(os.path.join(line, PACKAGE)):
                    return os.path.join(line, PACKAGE)
    return None


def _readText(path):
    """A small text file of an environment; "" when it cannot be read (then it names no package)."""
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except (OSError, UnicodeDecodeError) as exc:
        logging.debug("MedViTExplain: skipping %s: %s", path, exc)
        return ""


def locatePackageSource(executable):
    """The ``medvit_explain`` package folder of the environment ``executable`` belongs to, or None.

    Looks in the executable's folder and up to three folders above it, in each of them and in its
    ``.venv`` / ``venv``: a ``medvit_explain`` folder (a checkout), ``lib/python3*/site-packages`` or
    ``Lib/site-packages`` (a virtual or conda environment), following an editable install to its source.
    """
    if not executable or not str(executable).strip():
        return None
    path = os.path.abspath(os.path.expanduser(str(executable).strip()))  # no resolve(): venv/bin/python is a link
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    for _ in range(4):
        for venv in (folder, os.path.join(folder, ".venv"), os.path.join(folder, "venv")):
            found = _packageIn(venv)
            if found:
                return found
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return None


def importHelpers(packageSource=None):
    """``medvit_explain.viewer_logic`` (standard library only, no torch).

    With ``packageSource`` (a ``medvit_explain`` folder) the package is loaded from there, as that one
    package: nothing else of its environment enters Slicer's ``sys.path``. Otherwise from Slicer's Python.
    """
    if PACKAGE in sys.modules:
        loaded = os.path.dirname(getattr(sys.modules[PACKAGE], "__file__", "") or "")
        if packageSource and os.path.normcase(os.path.abspath(loaded)) != os.path.normcase(
            os.path.abspath(packageSource)
        ):
            logging.warning(
                "MedViTExplain: using medvit_explain from %s (already loaded), not %s; restart Slicer to switch",
                loaded,
                packageSource,
            )
    elif packageSource:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, os.path.join(packageSource, "__init__.py"), submodule_search_locations=[packageSource]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACKAGE]
            raise
    return importlib.import_module(PACKAGE + ".viewer_logic")


def launchProcess(args, updateEnvironment=None):
    """Start ``args`` (a list, never a shell string) in its own process group, in Slicer's startup
    environment, with stdout and stderr merged into one text pipe (what ``launchConsoleProcess`` does,
    plus the process group that lets Cancel end the whole tree)."""
    environment = slicer.util.startupEnvironment()
    environment.update(updateEnvironment or {})
    environment["PYTHONUNBUFFERED"] = "1"
    environment.setdefault("PYTHONIOENCODING", "utf-8")
    options = dict(
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        universal_newlines=True,  # tqdm's "\r" updates become lines
        encoding="utf-8",
        errors="replace",
        env=environment,
    )
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags = subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0
        options.update(startupinfo=info, creationflags=subprocess.CREATE_NEW_PROCESS_GROUP)
    else:
        options["start_new_session"] = True
    return subprocess.Popen([str(a) for a in args], **options)


def endProcessTree(proc, timeout=5.0):
    """End ``proc`` and every process it started: its process group gets SIGTERM, then (once ``proc`` has
    ended or ``timeout / 2`` passed) SIGKILL, so a child that ignores SIGTERM ends too. Windows: taskkill /T."""
    if os.name == "nt":
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(proc.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            check=False,
        )
    else:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout / 2)
            except subprocess.TimeoutExpired:
                pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def removeFolder(path):
    """Remove a folder the module made; a failure is logged (the folder is Slicer's temporary one)."""
    if path and os.path.isdir(path):
        try:
            shutil.rmtree(path)
        except OSError as exc:
            logging.warning("MedViTExplain: could not remove %s: %s", path, exc)


def safeFileName(name):
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name or "")).strip("._")
    return text[:80] or "ct"


class ProcessRunner:
    """One command, run without blocking Slicer.

    A thread reads the merged stdout/stderr line by line into a queue (it touches neither Qt nor MRML);
    a ``qt.QTimer`` on Slicer's main thread drains it every ``POLL_INTERVAL_MS``, calling ``onLine(line)``
    for every non-empty line and ``onFinished(runner)`` once at the end (``returncode``, ``cancelled``).
    """

    def __init__(self, args, onLine=None, onFinished=None, updateEnvironment=None):
        self.args = [str(a) for a in args]
        self.onLine = onLine
        self.onFinished = onFinished
        self.updateEnvironment = updateEnvironment
        self.proc = None
        self.lines = []
        self.returncode = None
        self.cancelled = False
        self._queue = queue.Queue()
        self._thread = None
        self._timer = None

    @property
    def running(self):
        return self.proc is not None and self.returncode is None

    @property
    def text(self):
        return "\n".join(self.lines)

    def start(self):
        try:
            self.proc = launchProcess(self.args, self.updateEnvironment)
        except OSError as exc:
            raise MedViTExplainError(f"Could not start {self.args[0]}: {exc}") from None
        self._thread = threading.Thread(target=self._read, name="MedViTExplain output", daemon=True)
        self._thread.start()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.poll)
        self._timer.start()
        return self

    def _read(self):  # worker thread
        try:
            for line in iter(self.proc.stdout.readline, ""):
                self._queue.put(("line", line.rstrip("\r\n")))
        finally:
            self._queue.put(("done", self.proc.wait()))

    def poll(self):
        """Hand the lines read so far to ``onLine``; finish when the process has ended (main thread)."""
        while self.running:
            try:
                kind, data = self._queue.get_nowait()
            except queue.Empty:
                return
            if kind == "line":
                if data.strip():
                    self.lines.append(data)
                    if self.onLine:
                        self.onLine(data)
            else:
                self._timer.stop()
                self.returncode = data
                if self.onFinished:
                    self.onFinished(self)

    def cancel(self):
        """End the process tree and finish now (``cancelled``); False when it was not running."""
        if not self.running:
            return False
        self.cancelled = True
        endProcessTree(self.proc)
        self._thread.join(10)
        self.poll()
        return True

    def wait(self, timeout=None):
        """Process Slicer's events until the command ends (for scripts and the self-test)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            slicer.app.processEvents()
            if not self.running:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise MedViTExplainError(f"{' '.join(self.args[:3])} … did not finish in {timeout:g} s (cancelled)")
            time.sleep(0.02)
        return self.returncode


class ExplainRun:
    """One ``explain`` run on one CT: its command, folders and outcome (``state``: running, done, failed,
    cancelled; ``result`` when done, ``error`` when failed)."""

    def __init__(self, inputNodeID, command, workDir, outputDir, stem, methods, targets, keepOutput):
        self.inputNodeID = inputNodeID
        self.command = command
        self.workDir = workDir
        self.outputDir = outputDir
        self.stem = stem
        self.methods = methods
        self.targets = targets
        self.keepOutput = keepOutput
        self.state = "running"
        self.result = None
        self.error = None
        self.progress = None
        self.runner = None
        self.onProgress = None
        self.onLine = None
        self.onFinished = None

    @property
    def running(self):
        return self.state == "running"

    def cancel(self):
        return self.runner.cancel() if self.runner is not None else False

    def wait(self, timeout=None):
        if self.runner is not None:
            self.runner.wait(timeout)
        return self


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
            "Explain a Vision Transformer's prediction (nodule malignancy and the LIDC biomarkers) on a CT: "
            "class-discriminative attention maps (CDAM, AG-CAM and baselines) over the scan, with the per-slice "
            "scores as a chart and a table. Red to yellow is evidence for the target, blue to light blue against "
            "it; weak values are transparent. Needs 3D Slicer 5.2 or newer and the medvit-explain command line: "
            "an existing executable (Settings), or installed into Slicer's Python (Slicer 5.10 or newer)."
        )
        self.parent.acknowledgementText = (
            "CDAM: Brocki, Binda & Chung, arXiv:2312.02364 (2023). AG-CAM: Leem & Seo, AAAI 2024. "
            "The subprocess and installation design follows the TotalSegmentator and MONAIAuto3DSeg extensions."
        )


#
# MedViTExplainWidget
#
class MedViTExplainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, Apply / Cancel with progress, the display controls, settings."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.run = None
        self.result = None
        self.methodQuery = None
        self.methodRows = []
        self._parameterNode = None
        self._updatingGUI = False
        self._plotView = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedViTExplain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedViTExplainLogic()

        self.ui.mapSelector.addAttribute("vtkMRMLScalarVolumeNode", MAP_ATTRIBUTE, "1")
        self.ui.executablePathLineEdit.currentPath = self.logic.executableSetting()
        self.ui.cancelButton.enabled = False

        for widget, signal_ in (
            (self.ui.inputSelector, "currentNodeChanged(vtkMRMLNode*)"),
            (self.ui.roiSelector, "currentNodeChanged(vtkMRMLNode*)"),
            (self.ui.deviceComboBox, "currentIndexChanged(int)"),
            (self.ui.batchSizeSpinBox, "valueChanged(int)"),
            (self.ui.methodsList, "itemSelectionChanged()"),
            (self.ui.targetsList, "itemSelectionChanged()"),
            (self.ui.outputFolderLineEdit, "currentPathChanged(QString)"),
            (self.ui.reportCheckBox, "toggled(bool)"),
        ):
            widget.connect(signal_, self.updateParameterNodeFromGUI)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.mapSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMapChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.percentileSlider.connect("valueChanged(double)", self.onWindowChanged)
        self.ui.transparentSlider.connect("valueChanged(double)", self.onWindowChanged)
        self.ui.jumpTopButton.connect("clicked(bool)", self.onJumpTop)
        self.ui.showScoresButton.connect("clicked(bool)", self.onShowScores)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.executablePathLineEdit.connect("currentPathChanged(QString)", self.onExecutableChanged)
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.initializeParameterNode()
        self.checkSetup()

    def cleanup(self):
        """Slicer exits or the module is reloaded: stop a run and remove the temporary folders."""
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()
        if self.methodQuery is not None and self.methodQuery.running:
            self.methodQuery.cancel()

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        if self.logic is not None:
            self.logic.cleanup()

    def onSceneEndClose(self, caller, event):
        self.result = None
        self.initializeParameterNode()
        self.setStatus("")
        self.updateButtons()

    # -- parameter node -----------------------------------------------------------------------------
    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        self.logic.setDefaultParameters(node)
        if node.GetNodeReference("InputVolume") is None:
            for candidate in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if not candidate.GetAttribute(MAP_ATTRIBUTE) and not candidate.IsA("vtkMRMLLabelMapVolumeNode"):
                    node.SetNodeReferenceID("InputVolume", candidate.GetID())
                    break
        self.setParameterNode(node)

    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        node = self._parameterNode
        if node is None or self._updatingGUI:
            return
        self._updatingGUI = True  # the widgets' change signals must not write back half-updated values
        try:
            self.ui.inputSelector.setCurrentNode(node.GetNodeReference("InputVolume"))
            self.ui.roiSelector.setCurrentNode(node.GetNodeReference("RoiNode"))
            self.ui.modelPathLineEdit.currentPath = node.GetParameter("Model")
            self.ui.outputFolderLineEdit.currentPath = node.GetParameter("OutputFolder")
            index = self.ui.deviceComboBox.findText(node.GetParameter("Device"))
            self.ui.deviceComboBox.currentIndex = max(0, index)
            self.ui.batchSizeSpinBox.value = int(float(node.GetParameter("BatchSize") or 16))
            self.ui.opacitySlider.value = float(node.GetParameter("Opacity"))
            self.ui.percentileSlider.value = float(node.GetParameter("Percentile"))
            self.ui.transparentSlider.value = float(node.GetParameter("TransparentPercent"))
            self.ui.reportCheckBox.checked = node.GetParameter("Report") != "false"
            self._selectItems(self.ui.methodsList, node.GetParameter("Methods").split(","))
            self._selectItems(self.ui.targetsList, node.GetParameter("Targets").split(","))
        finally:
            self._updatingGUI = False
        self.updateButtons()

    def updateParameterNodeFromGUI(self, *_):
        node = self._parameterNode
        if node is None or self._updatingGUI:
            return
        wasModifying = node.StartModify()
        node.SetNodeReferenceID("InputVolume", self.ui.inputSelector.currentNodeID)
        node.SetNodeReferenceID("RoiNode", self.ui.roiSelector.currentNodeID)
        node.SetParameter("Model", self.ui.modelPathLineEdit.currentPath.strip())
        node.SetParameter("OutputFolder", self.ui.outputFolderLineEdit.currentPath.strip())
        node.SetParameter("Device", self.ui.deviceComboBox.currentText)
        node.SetParameter("BatchSize", str(int(self.ui.batchSizeSpinBox.value)))
        node.SetParameter("Opacity", f"{self.ui.opacitySlider.value:g}")
        node.SetParameter("Percentile", f"{self.ui.percentileSlider.value:g}")
        node.SetParameter("TransparentPercent", f"{self.ui.transparentSlider.value:g}")
        node.SetParameter("Report", "true" if self.ui.reportCheckBox.checked else "false")
        if self.ui.methodsList.count:
            node.SetParameter("Methods", ",".join(self._selected(self.ui.methodsList)))
        if self.ui.targetsList.count:
            node.SetParameter("Targets", ",".join(self._selected(self.ui.targetsList)))
        node.EndModify(wasModifying)
        self.updateButtons()

    # -- lists ----------------------------------------------------------------------------------------
    @staticmethod
    def _fillList(listWidget, rows, selected):
        listWidget.clear()
        for row in rows:
            item = qt.QListWidgetItem(row["name"])
            tip = " ".join(str(row.get(k) or "") for k in ("title", "description", "citation")).strip()
            if tip:
                item.setToolTip(tip)
            listWidget.addItem(item)
            item.setSelected(row["name"] in selected)

    @staticmethod
    def _selectItems(listWidget, names):
        for i in range(listWidget.count):
            item = listWidget.item(i)
            item.setSelected(item.text() in names)

    @staticmethod
    def _selected(listWidget):
        return [listWidget.item(i).text() for i in range(listWidget.count) if listWidget.item(i).isSelected()]

    # -- setup: version, command line, methods, targets ---------------------------------------------
    def checkSetup(self):
        """Check the Slicer version and the command line; read the methods (in the background) and the
        model's targets. Leaves a message in the status and setup labels when something is missing."""
        if self.methodQuery is not None and self.methodQuery.running:
            self.methodQuery.cancel()  # a query of the previous setting
        problem = versionProblem()
        if problem is None:
            try:
                cli = self.logic.cliCommand()
            except MedViTExplainError as exc:
                problem = str(exc)
            else:
                self.ui.setupLabel.text = "Runs: " + " ".join(cli)
        installBlocker = installProblem(self.logic.pythonVersion)
        self.ui.installButton.enabled = installBlocker is None and not self.logic.installedInSlicer()
        self.ui.installButton.toolTip = installBlocker or "PyTorch from the PyTorch extension, then medvit-explain."
        if problem is not None:
            self.ui.setupLabel.text = problem
            self.setStatus(problem)
            self.methodRows = []
            self.ui.methodsList.clear()
            self.ui.targetsList.clear()
            self.updateButtons()
            return False
        self.setStatus("Reading the explanation methods ...")
        try:
            self.methodQuery = self.logic.startMethodQuery(self.onMethodsRead)
        except MedViTExplainError as exc:
            self.onMethodsRead(None, str(exc))
        self.onModelChanged()
        return True

    def onMethodsRead(self, rows, error):
        self.methodQuery = None
        if error == "cancelled":
            return
        if error is not None:
            self.setStatus(f"Could not read the methods: {error}")
            self.updateButtons()
            return
        self.methodRows = rows
        selected = (self._parameterNode.GetParameter("Methods") if self._parameterNode else "cdam").split(",")
        previous, self._updatingGUI = self._updatingGUI, True
        try:
            self._fillList(self.ui.methodsList, rows, selected)
        finally:
            self._updatingGUI = previous
        self.setStatus("")
        self.updateButtons()

    def onModelChanged(self, *_):
        """The targets of the chosen model (its config.json; the shipped model when empty)."""
        model = self.ui.modelPathLineEdit.currentPath.strip()
        try:
            targets = self.logic.modelTargets(model)
        except (MedViTExplainError, ValueError) as exc:
            self.setStatus(f"Cannot read the model's targets: {exc}")
            targets = None
        selected = (self._parameterNode.GetParameter("Targets") if self._parameterNode else "malignancy").split(",")
        previous, self._updatingGUI = self._updatingGUI, True
        try:
            if targets is None:  # a model whose config names its task: all of its targets are explained
                self.ui.targetsList.clear()
                self.ui.targetsList.toolTip = "This model's targets are not listed in its config: all are explained."
            else:
                self._fillList(self.ui.targetsList, targets, selected)
        finally:
            self._updatingGUI = previous
        self.updateParameterNodeFromGUI()  # nothing while the panel is being updated from the node

    def onExecutableChanged(self, path):
        self.logic.setExecutableSetting(path)
        self.checkSetup()

    def onInstall(self):
        if not slicer.util.confirmOkCancelDisplay(
            "Install medvit-explain into Slicer's Python? PyTorch comes from the PyTorch extension (a build that "
            "fits this computer), then medvit-explain and its requirements except torch and SimpleITK. This "
            "downloads several hundred MB and may take minutes.",
            "Install medvit-explain",
        ):
            return
        self.setStatus("Installing medvit-explain into Slicer's Python ...")
        try:
            with slicer.util.WaitCursor():
                self.logic.installIntoSlicer(log=self.setStatus)
        except InstallError as exc:
            self.setStatus(f"Installation failed: {exc}")
            slicer.util.errorDisplay(f"Installing medvit-explain failed.\n\n{exc}", windowTitle="MedViT Explain")
            return
        self.setStatus("medvit-explain is installed in Slicer's Python.")
        self.checkSetup()

    # -- running ------------------------------------------------------------------------------------
    def updateButtons(self, *_):
        if self.ui is None:
            return
        running = self.run is not None and self.run.running
        ready = (
            versionProblem() is None
            and self.ui.inputSelector.currentNode() is not None
            and bool(self._selected(self.ui.methodsList))
        )
        self.ui.applyButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running
        hasResult = self.result is not None and not running
        self.ui.jumpTopButton.enabled = hasResult and self.result.get("top") is not None
        self.ui.showScoresButton.enabled = hasResult
        self.ui.openReportButton.enabled = hasResult and bool(self.result.get("report"))

    def setStatus(self, text):
        self.ui.statusLabel.text = text

    def onApply(self):
        ct = self.ui.inputSelector.currentNode()
        self.updateParameterNodeFromGUI()
        try:
            transformProblem = self.logic.transformProblem(ct)
            if transformProblem is not None:
                if not slicer.util.confirmYesNoDisplay(
                    transformProblem + "\n\nHarden the transform now? The CT's geometry changes permanently "
                    "(its voxels stay as they are).",
                    windowTitle="MedViT Explain",
                ):
                    self.setStatus("Not run: " + transformProblem)
                    return
                self.logic.hardenTransform(ct)
            methods = self._selected(self.ui.methodsList)
            targets = self._selected(self.ui.targetsList)
            if self.ui.targetsList.count and not targets:
                raise MedViTExplainError("Choose at least one target.")
            self.run = self.logic.startExplain(
                ct,
                model=self.ui.modelPathLineEdit.currentPath.strip() or None,
                methods=methods,
                targets=targets,
                device=self.ui.deviceComboBox.currentText,
                batchSize=int(self.ui.batchSizeSpinBox.value),
                roiNode=self.ui.roiSelector.currentNode(),
                outputFolder=self.ui.outputFolderLineEdit.currentPath.strip() or None,
                report=bool(self.ui.reportCheckBox.checked),
                onProgress=self.onProgress,
                onFinished=self.onRunFinished,
            )
        except MedViTExplainError as exc:
            self.setStatus(f"Not run: {exc}")
            slicer.util.errorDisplay(str(exc), windowTitle="MedViT Explain")
            self.updateButtons()
            return
        self.ui.progressBar.maximum = 1
        self.ui.progressBar.value = 0
        self.setStatus(f"Running medvit-explain on {ct.GetName()} ...")
        self.updateButtons()

    def onProgress(self, progress):
        self.ui.progressBar.maximum = max(1, progress.total)
        self.ui.progressBar.value = min(progress.done, max(1, progress.total))
        self.setStatus(f"{progress.label or 'medvit-explain'}: {progress.done}/{progress.total}")

    def onCancel(self):
        if self.run is not None and self.run.running:
            self.run.cancel()

    def onRunFinished(self, run):
        self.run = None
        if run.state == "cancelled":
            self.ui.progressBar.value = 0
            self.setStatus("Cancelled; its output was removed.")
        elif run.state == "failed":
            self.ui.progressBar.value = 0
            self.setStatus(f"Failed: {run.error}")
            slicer.util.errorDisplay(
                f"medvit-explain failed: {run.error}",
                windowTitle="MedViT Explain",
                detailedText=run.runner.text[-6000:] if run.runner is not None else "",
            )
        else:
            self.result = run.result
            self.ui.progressBar.value = self.ui.progressBar.maximum
            self.showResult(run.result)
        self.updateButtons()

    # -- display ------------------------------------------------------------------------------------
    def showResult(self, result):
        maps = result["maps"]
        first = next(iter(maps.values()), None)
        self.ui.mapSelector.setCurrentNode(first)
        self.onMapChanged(first)  # also when it was the current map already (a replaced node)
        self.logic.showScores(result)
        self.connectPlotView()
        top = result["top"]
        if top is not None:
            self.logic.jumpToRow(result["input"], top)
        self.setStatus(self.logic.summary(result))

    def onMapChanged(self, node):
        if node is None:
            return
        ct = (
            slicer.mrmlScene.GetNodeByID(node.GetAttribute(INPUT_ATTRIBUTE) or "")
            or self.ui.inputSelector.currentNode()
        )
        if ct is None:
            return
        self.logic.setMapDisplay(node, self.ui.percentileSlider.value, self.ui.transparentSlider.value / 100.0)
        self.logic.showOverlay(ct, node, self.ui.opacitySlider.value)

    def onOpacityChanged(self, value):
        self.updateParameterNodeFromGUI()
        slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def onWindowChanged(self, *_):
        self.updateParameterNodeFromGUI()
        node = self.ui.mapSelector.currentNode()
        if node is not None:
            self.logic.setMapDisplay(node, self.ui.percentileSlider.value, self.ui.transparentSlider.value / 100.0)

    def onJumpTop(self):
        if self.result is not None and self.result.get("top") is not None:
            self.logic.jumpToRow(self.result["input"], self.result["top"])

    def onShowScores(self):
        if self.result is not None:
            self.logic.showScores(self.result)
            self.connectPlotView()

    def onOpenReport(self):
        if self.result is not None and self.result.get("report"):
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self.result["report"]))

    def connectPlotView(self):
        """Clicking a point of the scores chart jumps to its slice (or ROI)."""
        layoutManager = slicer.app.layoutManager()
        plotWidget = layoutManager.plotWidget(0) if layoutManager is not None else None
        if plotWidget is None:
            return
        view = plotWidget.plotView()
        if view is not self._plotView:
            view.connect("dataSelected(vtkStringArray*, vtkCollection*)", self.onPlotDataSelected)
            self._plotView = view

    def onPlotDataSelected(self, seriesIDs, selection):
        if self.result is None or self.result.get("series") is None:
            return
        for i in range(seriesIDs.GetNumberOfValues()):
            if seriesIDs.GetValue(i) != self.result["series"].GetID():
                continue
            points = selection.GetItemAsObject(i)
            if points is not None and points.GetNumberOfValues():
                row = int(points.GetValue(points.GetNumberOfValues() - 1))
                if 0 <= row < len(self.result["rows"]):
                    self.logic.jumpToRow(self.result["input"], self.result["rows"][row])


#
# MedViTExplainLogic
#
class MedViTExplainLogic(ScriptedLoadableModuleLogic):
    """Runs the medvit-explain CLI on a volume node and shows its outputs (no GUI dependency)."""

    _methodRows = {}  # the argument list of a CLI → its list-methods rows (read once per Slicer session)

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None  # every CLI line that is not progress; logging.info when None
        self.pythonVersion = tuple(sys.version_info[:2])
        self.activeRun = None
        self.workDirs = {}  # CT node ID → the temporary folder of its shown run (kept for the report)
        self._helpers = None

    def setDefaultParameters(self, parameterNode):
        for name, value in DEFAULT_PARAMETERS.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    # -- the command line -----------------------------------------------------------------------------
    @staticmethod
    def executableSetting():
        return str(qt.QSettings().value(EXECUTABLE_SETTING, "") or "").strip()

    def setExecutableSetting(self, path):
        qt.QSettings().setValue(EXECUTABLE_SETTING, str(path or "").strip())
        self._helpers = None

    @staticmethod
    def installedInSlicer():
        """Whether medvit-explain is installed in Slicer's own Python (path b)."""
        try:
            importlib.metadata.version(DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    @staticmethod
    def pythonSlicer():
        """Slicer's Python launcher (it sets up Slicer's environment for the child)."""
        return shutil.which("PythonSlicer") or shutil.which("PythonSlicer.exe") or sys.executable

    def helpers(self):
        """``medvit_explain.viewer_logic``: from the executable's environment, else from Slicer's Python."""
        if self._helpers is None:
            executable = self.executableSetting()
            source = locatePackageSource(executable) if executable else None
            try:
                self._helpers = importHelpers(source)
            except ImportError:
                if executable:
                    raise MedViTExplainError(
                        f"Cannot find the medvit_explain package of {executable}: choose the medvit-explain or "
                        "python of the environment it is installed in (e.g. <checkout>/.venv/bin/medvit-explain)."
                    ) from None
                raise MedViTExplainError(NOT_AVAILABLE) from None
        return self._helpers

    def cliCommand(self):
        """The argument list that starts the CLI; MedViTExplainError says what to set up when there is none."""
        executable = self.executableSetting()
        if executable:
            helpers = self.helpers()
            try:
                return helpers.cli_command(executable)
            except ValueError as exc:
                raise MedViTExplainError(f"The medvit-explain executable in Settings is not usable: {exc}") from None
        if self.installedInSlicer():
            self.helpers()
            return [self.pythonSlicer(), "-m", PACKAGE]
        raise MedViTExplainError(NOT_AVAILABLE)

    def unavailableReason(self):
        """None when explaining can run here, else why not (the self-test skips with it)."""
        problem = versionProblem()
        if problem is not None:
            return problem
        try:
            self.cliCommand()
        except MedViTExplainError as exc:
            return str(exc)
        return None

    def startMethodQuery(self, onFinished):
        """Read ``list-methods --json`` in the background; ``onFinished(rows, None)`` or ``(None, error)``.
        Returns the ProcessRunner (None when the list was read before)."""
        cli = self.cliCommand()
        key = tuple(cli)
        if key in self._methodRows:
            onFinished(self._methodRows[key], None)
            return None
        helpers = self.helpers()

        def finished(runner):
            if runner.cancelled:
                onFinished(None, "cancelled")
                return
            if runner.returncode != 0:
                onFinished(None, helpers.cli_error_message(runner.text) or f"exit code {runner.returncode}")
                return
            try:
                rows = helpers.parse_method_list(runner.text)
            except ValueError as exc:
                onFinished(None, str(exc))
                return
            self._methodRows[key] = rows
            onFinished(rows, None)

        return ProcessRunner(helpers.list_methods_command(cli), onFinished=finished).start()

    def methodRows(self, timeout=120):
        """The method rows of ``list-methods --json`` (blocking while Slicer keeps processing events)."""
        outcome = {}
        runner = self.startMethodQuery(lambda rows, error: outcome.update(rows=rows, error=error))
        if runner is not None:
            runner.wait(timeout)
        if outcome.get("error"):
            raise MedViTExplainError(f"medvit-explain list-methods failed: {outcome['error']}")
        return outcome["rows"]

    def knownMethodNames(self):
        """The method names read so far (None before the first list-methods: the CLI checks them)."""
        rows = self._methodRows.get(tuple(self.cliCommand()))
        return None if rows is None else [row["name"] for row in rows]

    def modelTargets(self, model=None):
        """The model's targets (rows with ``name``) from its config.json; None when it does not list them."""
        return self.helpers().model_targets(model or None)

    # -- installing into Slicer's Python (path b) ------------------------------------------------------
    def installIntoSlicer(self, requirement=None, log=None):
        """PyTorch through the PyTorch extension, then medvit-explain and its requirements except torch and
        SimpleITK. Raises InstallError with what failed and what to do."""
        say = log or logging.info
        problem = installProblem(self.pythonVersion)
        if problem is not None:
            raise InstallError(problem)
        requirement = requirement or str(qt.QSettings().value(REQUIREMENT_SETTING, DEFAULT_REQUIREMENT) or "")
        requirement = requirement.strip() or DEFAULT_REQUIREMENT
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise InstallError(
                "Installing into Slicer's Python needs the PyTorch extension (it installs a PyTorch build that "
                "fits this computer's GPU driver): install 'PyTorch' from the Extensions Manager, restart Slicer "
                "and try again; or use an existing medvit-explain executable (Settings)."
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            say("Installing PyTorch with the PyTorch extension (this may take several minutes) ...")
            try:
                torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
            except Exception as exc:
                raise InstallError(f"Installing PyTorch failed: {exc}. Try the 'PyTorch Utils' module.") from exc
            if torch is None:
                raise InstallError("PyTorch was not installed; medvit-explain needs torch" + TORCH_REQUIREMENT + ".")
        say(f"Installing {requirement} ...")
        self._pip([requirement, "--no-deps"])
        importlib.invalidate_caches()
        try:
            requires = importlib.metadata.requires(DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            raise InstallError(f"pip installed {requirement!r} but no {DISTRIBUTION} package is there.") from None
        wanted = dependencyRequirements(requires)
        if wanted:
            say("Installing medvit-explain's requirements (not torch, not SimpleITK) ...")
            self._pip(wanted)
        importlib.invalidate_caches()
        self._helpers = None
        self._methodRows.clear()
        return wanted

    @staticmethod
    def _pip(arguments):
        try:
            slicer.util.pip_install(list(arguments))
        except Exception as exc:  # CalledProcessError, or whatever pip_install raises in this Slicer
            raise InstallError(
                f"pip install {' '.join(arguments)} failed: {exc}. See the Python console for pip's output."
            ) from exc

    # -- input checks ---------------------------------------------------------------------------------
    @staticmethod
    def transformProblem(ctNode):
        """Why the CT cannot be explained as it is placed (a parent transform), or None."""
        if ctNode is None:
            return None
        transform = ctNode.GetParentTransformNode()
        if transform is None:
            return None
        return (
            f"'{ctNode.GetName()}' is under the transform '{transform.GetName()}'. medvit-explain reads the voxels "
            "without it, so the maps would be misplaced. Harden the transform (Data module: right-click the CT, "
            "'Harden transform') or remove it, then Apply again."
        )

    def checkInput(self, ctNode):
        if ctNode is None:
            raise MedViTExplainError("Choose a CT volume.")
        if ctNode.GetImageData() is None:
            raise MedViTExplainError(f"'{ctNode.GetName()}' has no image data.")
        problem = self.transformProblem(ctNode)
        if problem is not None:
            raise TransformError(problem)

    @staticmethod
    def hardenTransform(ctNode):
        if not slicer.vtkSlicerTransformLogic().hardenTransform(ctNode):
            raise TransformError(f"Could not harden the transform of '{ctNode.GetName()}'.")

    # -- files ----------------------------------------------------------------------------------------
    @staticmethod
    def temporaryRoot():
        root = str(slicer.app.temporaryPath)
        os.makedirs(root, exist_ok=True)
        return root

    @staticmethod
    def exportVolume(volumeNode, path):
        """Write a volume node through a throw-away storage node: its own storage node is not touched."""
        storage = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(path)
            storage.UseCompressionOff()
            if not storage.WriteData(volumeNode):
                raise MedViTExplainError(f"Could not write '{volumeNode.GetName()}' to {path}.")
        finally:
            storage.UnRegister(None)
        return path

    @staticmethod
    def readVolume(volumeNode, path):
        """Read ``path`` into a volume node through a throw-away storage node (the node keeps none pointing
        at a temporary file: saving the scene writes its data)."""
        storage = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            storage.SetSingleFile(True)
            if not storage.ReadData(volumeNode):
                raise MedViTExplainError(f"Could not read {path}.")
        finally:
            storage.UnRegister(None)
        return volumeNode

    @staticmethod
    def controlPointsLps(markupsNode):
        """The control points of a markup node in world LPS millimetres (what ``--roi-centers`` reads)."""
        centres = []
        for i in range(markupsNode.GetNumberOfControlPoints()):
            ras = [0.0, 0.0, 0.0]
            markupsNode.GetNthControlPointPositionWorld(i, ras)
            centres.append((-ras[0], -ras[1], ras[2]))
        return centres

    def writeRoiInput(self, roiNode, ctNode, folder):
        """The ROI options of ``explain_command`` for a markup point list (one point per nodule →
        ``roi_centers``) or a segmentation (one label per visible segment on the CT's grid → ``roi_mask``)."""
        if roiNode is None:
            return {}
        if roiNode.IsA("vtkMRMLMarkupsNode"):
            centres = self.controlPointsLps(roiNode)
            if not centres:
                raise MedViTExplainError(f"'{roiNode.GetName()}' has no points: place one on each nodule.")
            path = self.helpers().write_roi_centers(os.path.join(folder, "roi_centers.csv"), centres)
            return {"roi_centers": str(path)}
        if roiNode.IsA("vtkMRMLSegmentationNode"):
            path = os.path.join(folder, "roi_mask.nrrd")
            labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "MedViTExplain ROI mask")
            try:
                if not slicer.modules.segmentations.logic().ExportVisibleSegmentsToLabelmapNode(
                    roiNode, labelmap, ctNode
                ):
                    raise MedViTExplainError(f"Could not export the segments of '{roiNode.GetName()}'.")
                self.exportVolume(labelmap, path)
            finally:
                self.removeNode(labelmap)
            return {"roi_mask": path}
        raise MedViTExplainError(
            f"expected a markup point list or a segmentation for the nodules, got {roiNode.GetClassName()}"
        )

    # -- running --------------------------------------------------------------------------------------
    def startExplain(
        self,
        ctNode,
        model=None,
        methods=("cdam",),
        targets=("malignancy",),
        device="auto",
        batchSize=None,
        roiNode=None,
        outputFolder=None,
        mapDtype="int16",
        report=True,
        onProgress=None,
        onLine=None,
        onFinished=None,
    ):
        """Start explaining ``ctNode``; returns the :class:`ExplainRun` at once. ``onProgress(Progress)``,
        ``onLine(line)`` and ``onFinished(run)`` are called on Slicer's main thread. Empty ``targets``:
        all of the model's. ``outputFolder``: keep the outputs in a new subfolder there (else a temporary
        folder); ``report=False`` skips report.html. Raises MedViTExplainError (TransformError) when it
        cannot start."""
        self.checkInput(ctNode)
        if self.activeRun is not None and self.activeRun.running:
            raise MedViTExplainError("medvit-explain is already running: wait for it or press Cancel.")
        cli = self.cliCommand()
        helpers = self.helpers()
        methods, targets = list(methods or []), list(targets or [])
        workDir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self.temporaryRoot())
        outputDir = None
        try:
            stem = safeFileName(ctNode.GetName())
            inputDir = os.path.join(workDir, "input")
            os.makedirs(inputDir)
            inputPath = self.exportVolume(ctNode, os.path.join(inputDir, stem + ".nrrd"))
            roiOptions = self.writeRoiInput(roiNode, ctNode, inputDir)
            if outputFolder:
                outputDir = self.newFolder(outputFolder, stem + "_explain")
            else:
                outputDir = os.path.join(workDir, "output")
            try:
                command = helpers.explain_command(
                    cli,
                    inputPath,
                    outputDir,
                    model=model or None,
                    methods=methods,
                    targets=targets,
                    device=device,
                    batch_size=batchSize,
                    map_dtype=mapDtype,
                    method_names=self.knownMethodNames(),
                    extra_args=() if report else ("--no-report",),
                    **roiOptions,
                )
            except ValueError as exc:
                raise MedViTExplainError(str(exc)) from None
            run = ExplainRun(ctNode.GetID(), command, workDir, outputDir, stem, methods, targets, bool(outputFolder))
            run.onProgress, run.onLine, run.onFinished = onProgress, onLine, onFinished

            def onRunnerLine(line):
                progress = helpers.parse_progress(line)
                if progress is not None:
                    run.progress = progress
                    if run.onProgress:
                        run.onProgress(progress)
                    return
                (self.logCallback or logging.info)(line)
                if run.onLine:
                    run.onLine(line)

            run.runner = ProcessRunner(command, onLine=onRunnerLine, onFinished=lambda _runner: self._finishRun(run))
            logging.info("MedViTExplain: running %s", " ".join(command))
            run.runner.start()
        except BaseException:
            removeFolder(workDir)
            if outputFolder and outputDir:
                removeFolder(outputDir)
            raise
        self.activeRun = run
        return run

    def process(self, ctNode, timeout=None, showResult=True, **options):
        """Explain ``ctNode`` and wait (scripts, the self-test): the result dict, or MedViTExplainError."""
        run = self.startExplain(ctNode, **options)
        run.wait(timeout)
        if run.state != "done":
            raise MedViTExplainError(run.error or f"medvit-explain was {run.state}")
        if showResult:
            self.showResult(run.result)
        return run.result

    def cancel(self):
        """Cancel the running explain (its process tree ends; its folders are removed)."""
        return self.activeRun.cancel() if self.activeRun is not None else False

    def _finishRun(self, run):
        if self.activeRun is run:
            self.activeRun = None
        runner = run.runner
        removeFolder(os.path.join(run.workDir, "input"))  # the exported CT and ROI inputs: never kept
        if runner.cancelled:
            run.state = "cancelled"
        elif runner.returncode != 0:
            run.state = "failed"
            run.error = self.helpers().cli_error_message(runner.text) or (
                f"medvit-explain failed with exit code {runner.returncode}"
            )
        else:
            try:
                run.result = self.loadResults(run)
                run.state = "done"
            except Exception as exc:  # reported to the user through run.error, with the traceback in the log
                logging.exception("MedViTExplain: loading the outputs of %s failed", run.outputDir)
                run.state = "failed"
                run.error = str(exc)
        if run.state == "done":
            if run.keepOutput:
                removeFolder(run.workDir)
            else:
                previous = self.workDirs.get(run.inputNodeID)
                if previous and previous != run.workDir:
                    removeFolder(previous)
                self.workDirs[run.inputNodeID] = run.workDir
        else:
            removeFolder(run.workDir)
            if run.keepOutput:
                removeFolder(run.outputDir)
        if run.onFinished:
            run.onFinished(run)

    def cleanup(self):
        """Cancel a running explain and remove every temporary folder (scene close, Slicer exit)."""
        if self.activeRun is not None and self.activeRun.running:
            self.activeRun.cancel()
        for folder in list(self.workDirs.values()):
            removeFolder(folder)
        self.workDirs.clear()

    @staticmethod
    def newFolder(parent, name):
        os.makedirs(parent, exist_ok=True)
        for i in range(1, 1000):
            path = os.path.join(parent, name if i == 1 else f"{name}_{i}")
            try:
                os.makedirs(path)
            except FileExistsError:
                continue
            return path
        raise MedViTExplainError(f"Could not make a new output folder in {parent}.")

    # -- results --------------------------------------------------------------------------------------
    @staticmethod
    def resultNodes(ctNode, role, className):
        return [
            node
            for node in slicer.util.getNodesByClass(className)
            if node.GetAttribute(INPUT_ATTRIBUTE) == ctNode.GetID() and node.GetAttribute(ROLE_ATTRIBUTE) == role
        ]

    def mapNodes(self, ctNode):
        return self.resultNodes(ctNode, "map", "vtkMRMLScalarVolumeNode")

    @staticmethod
    def removeNode(node):
        """Remove a node and its display nodes (a map's colour legend included)."""
        for i in reversed(range(node.GetNumberOfDisplayNodes() if hasattr(node, "GetNumberOfDisplayNodes") else 0)):
            display = node.GetNthDisplayNode(i)
            if display is not None:
                slicer.mrmlScene.RemoveNode(display)
        slicer.mrmlScene.RemoveNode(node)

    @staticmethod
    def _tag(node, ctNode, role):
        node.SetAttribute(INPUT_ATTRIBUTE, ctNode.GetID())
        node.SetAttribute(ROLE_ATTRIBUTE, role)

    def loadResults(self, run):
        """Read a finished run's outputs into the scene, replacing the previous run's nodes of that CT."""
        ctNode = slicer.mrmlScene.GetNodeByID(run.inputNodeID)
        if ctNode is None:
            raise MedViTExplainError("The CT was removed from the scene while medvit-explain ran.")
        helpers = self.helpers()
        found = helpers.find_outputs(run.outputDir, run.stem, methods=run.methods or None, targets=run.targets or None)
        if not found:
            raise MedViTExplainError(f"medvit-explain wrote no maps into {run.outputDir}.")
        previous = {}
        for node in self.mapNodes(ctNode):
            key = (node.GetAttribute(MAP_ATTRIBUTE + ".method"), node.GetAttribute(MAP_ATTRIBUTE + ".target"))
            previous[key] = node
        maps = {}
        for (method, target), path in found.items():
            node = previous.pop((method, target), None)
            if node is None:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
            node.SetName(f"{ctNode.GetName()} {method} {target}")
            self.readVolume(node, path)
            self._tag(node, ctNode, "map")
            node.SetAttribute(MAP_ATTRIBUTE, "1")
            node.SetAttribute(MAP_ATTRIBUTE + ".method", method)
            node.SetAttribute(MAP_ATTRIBUTE + ".target", target)
            self.setMapDisplay(node)
            maps[(method, target)] = node
        for stale in previous.values():
            self.removeNode(stale)

        columns, rows = helpers.parse_predictions(os.path.join(run.outputDir, helpers.PREDICTIONS))
        table = self.scoresTable(ctNode, columns, rows)
        chart, series = self.scoresChart(ctNode, table, columns)
        folder = self.placeInHierarchy(ctNode, [*maps.values(), table, chart, series])
        report = os.path.join(run.outputDir, helpers.REPORT)
        return {
            "input": ctNode,
            "maps": maps,
            "columns": columns,
            "rows": rows,
            "top": helpers.top_slice(rows),
            "table": table,
            "chart": chart,
            "series": series,
            "folder": folder,
            "outputDir": run.outputDir,
            "report": report if os.path.isfile(report) else None,
        }

    def scoresTable(self, ctNode, columns, rows):
        """The scores as a table node (one per CT, refilled on each run; saved with the scene)."""
        existing = self.resultNodes(ctNode, "scores", "vtkMRMLTableNode")
        node = existing[0] if existing else slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode")
        node.SetName(f"{ctNode.GetName()} MedViT scores")
        self._tag(node, ctNode, "scores")
        node.RemoveAllColumns()
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
        node.SetUseColumnNameAsColumnHeader(True)
        node.Modified()
        return node

    def scoresChart(self, ctNode, tableNode, columns):
        """The malignancy probability per slice (or per ROI) as a plot chart over the scores table;
        (None, None) when the model has no malignancy output."""
        helpers = self.helpers()
        y = helpers.PRIMARY_COLUMN
        x = "source_index" if "source_index" in columns else ("roi" if "roi" in columns else None)
        if y not in columns or x is None:
            return None, None
        charts = self.resultNodes(ctNode, "chart", "vtkMRMLPlotChartNode")
        seriesNodes = self.resultNodes(ctNode, "series", "vtkMRMLPlotSeriesNode")
        series = seriesNodes[0] if seriesNodes else slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode")
        series.SetName(f"{ctNode.GetName()} {y}")
        self._tag(series, ctNode, "series")
        series.SetAndObserveTableNodeID(tableNode.GetID())
        series.SetXColumnName(x)
        series.SetYColumnName(y)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        series.SetColor(0.85, 0.1, 0.1)
        chart = charts[0] if charts else slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode")
        chart.SetName(f"{ctNode.GetName()} MedViT chart")
        self._tag(chart, ctNode, "chart")
        if not chart.HasPlotSeriesNodeID(series.GetID()):
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle(f"{ctNode.GetName()}: {y.replace('_', ' ')} (click a point to go to it)")
        chart.SetXAxisTitle("slice (k index)" if x == "source_index" else "ROI")
        chart.SetYAxisTitle(y.replace("_", " "))
        return chart, series

    def placeInHierarchy(self, ctNode, nodes):
        """Put the result nodes in one folder under the CT's study (its parent) in the subject hierarchy."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        ctItem = sh.GetItemByDataNode(ctNode)
        parent = sh.GetItemParent(ctItem) if ctItem else sh.GetSceneItemID()
        name = f"MedViT Explain: {ctNode.GetName()}"
        folder = None
        children = vtk.vtkIdList()
        sh.GetItemChildren(parent, children)
        for i in range(children.GetNumberOfIds()):
            if sh.GetItemAttribute(children.GetId(i), INPUT_ATTRIBUTE) == ctNode.GetID():
                folder = children.GetId(i)
                sh.SetItemName(folder, name)
                break
        if folder is None:
            folder = sh.CreateFolderItem(parent, name)
            sh.SetItemAttribute(folder, INPUT_ATTRIBUTE, ctNode.GetID())
        for node in nodes:
            if node is not None:
                item = sh.GetItemByDataNode(node)
                if item:
                    sh.SetItemParent(item, folder)
        return folder

    @staticmethod
    def summary(result):
        top = result["top"]
        text = f"Done: {len(result['maps'])} map(s) of {result['input'].GetName()}."
        if top is not None:
            where = f"ROI {top['roi']}" if "roi" in top else f"slice {top.get('source_index', top.get('slice'))}"
            text += f" Highest malignancy probability {top.get('malignancy_prob', float('nan')):.3f} on {where}."
        return text

    # -- display ------------------------------------------------------------------------------------
    def colorTable(self, signed, transparentFraction):
        """The module's colour table (signed or positive-only), made once per scene, refilled when the
        transparent fraction changes."""
        role = "colors:signed" if signed else "colors:positive"
        tables = slicer.util.getNodesByClass("vtkMRMLColorTableNode")
        node = next((n for n in tables if n.GetAttribute(ROLE_ATTRIBUTE) == role), None)
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLColorTableNode", "MedViT signed" if signed else "MedViT positive"
            )
            node.SetTypeToUser()
            node.SetNumberOfColors(NUMBER_OF_COLORS)
            node.SetAttribute(ROLE_ATTRIBUTE, role)
            node.SetAttribute("Category", "MedViT Explain")
        fraction = f"{float(transparentFraction):.4f}"
        if node.GetAttribute("MedViTExplain.TransparentFraction") != fraction:
            wasModifying = node.StartModify()
            colors = self.helpers().overlay_colors(NUMBER_OF_COLORS, signed, float(transparentFraction))
            for i, (r, g, b, a) in enumerate(colors):
                node.SetColor(i, r, g, b, a)
            node.SetAttribute("MedViTExplain.TransparentFraction", fraction)
            node.EndModify(wasModifying)
        return node

    def setMapDisplay(self, mapNode, percentile=None, transparentFraction=None):
        """The module's colour table, a window from ``percentile`` of the map's non-zero |value|s
        (``(-m, m)``, or ``(0, m)`` for a non-negative map), no auto window-level, a colour legend."""
        helpers = self.helpers()
        percentile = helpers.DEFAULT_PERCENTILE if percentile is None else float(percentile)
        if transparentFraction is None:
            transparentFraction = helpers.DEFAULT_TRANSPARENT_FRACTION
        lo, hi = helpers.robust_window(slicer.util.arrayFromVolume(mapNode), percentile)
        signed = lo < 0
        if mapNode.GetDisplayNode() is None:
            mapNode.CreateDefaultDisplayNodes()
        display = mapNode.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.colorTable(signed, transparentFraction).GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(lo, hi)
        display.SetApplyThreshold(False)
        display.SetInterpolate(True)
        mapNode.SetAttribute(MAP_ATTRIBUTE + ".signed", "1" if signed else "0")
        legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(mapNode)
        if legend is not None:
            method = mapNode.GetAttribute(MAP_ATTRIBUTE + ".method") or ""
            target = mapNode.GetAttribute(MAP_ATTRIBUTE + ".target") or ""
            legend.SetTitleText(f"{method} {target}".strip() or mapNode.GetName())
            legend.SetLabelFormat("%.3g")
        return lo, hi

    @staticmethod
    def colorLegend(node):
        for i in range(node.GetNumberOfDisplayNodes()):
            display = node.GetNthDisplayNode(i)
            if display is not None and display.IsA("vtkMRMLColorLegendDisplayNode"):
                return display
        return None

    def showOverlay(self, ctNode, mapNode, opacity=None):
        """The CT in the background, the map in the foreground of every slice view; only its legend shown."""
        if opacity is None:
            opacity = float(DEFAULT_PARAMETERS["Opacity"])
        slicer.util.setSliceViewerLayers(background=ctNode, foreground=mapNode, foregroundOpacity=opacity, fit=False)
        for node in self.mapNodes(ctNode):
            legend = self.colorLegend(node)
            if legend is not None:
                legend.SetVisibility(node is mapNode)

    def showScores(self, result):
        """The scores table in the table view and the chart in the plot view (a layout with both)."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        appLogic = slicer.app.applicationLogic()
        appLogic.GetSelectionNode().SetActiveTableID(result["table"].GetID())
        appLogic.PropagateTableSelection()
        if result.get("chart") is not None:
            slicer.modules.plots.logic().ShowChartInLayout(result["chart"])

    def showResult(self, result, opacity=None):
        first = next(iter(result["maps"].values()), None)
        if first is not None:
            self.showOverlay(result["input"], first, opacity)
        self.showScores(result)
        if result["top"] is not None:
            self.jumpToRow(result["input"], result["top"])

    @staticmethod
    def sliceAxis(volumeNode):
        """The IJK axis closest to the patient's superior direction (the axial slicing axis)."""
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        return max(range(3), key=lambda c: abs(ijkToRas.GetElement(2, c)))

    def rowPosition(self, volumeNode, row):
        """The RAS point of a scores row: an ROI's centre (LPS in the table), or the middle of a slice."""
        if row is None:
            return None
        if all(row.get(k) is not None for k in ("center_x_mm", "center_y_mm", "center_z_mm")):
            return (-float(row["center_x_mm"]), -float(row["center_y_mm"]), float(row["center_z_mm"]))
        if row.get("source_index") is None:
            return None
        dims = volumeNode.GetImageData().GetDimensions()
        ijk = [(d - 1) / 2.0 for d in dims]
        ijk[self.sliceAxis(volumeNode)] = float(row["source_index"])
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        return tuple(ijkToRas.MultiplyPoint([*ijk, 1.0])[:3])

    def jumpToRow(self, volumeNode, row):
        """Move the slice views to the row's slice or ROI centre; returns the RAS point (or None)."""
        ras = self.rowPosition(volumeNode, row)
        if ras is not None:
            for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
                sliceNode.JumpSliceByOffsetting(*ras)
        return ras


#
# MedViTExplainTest
#
class MedViTExplainTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: explains the bundled sample and checks geometry, display and data safety.

    Skips (with a message, no error) when medvit-explain is not set up."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = MedViTExplainLogic().unavailableReason()
        if reason is not None:
            message = f"MedViTExplain self-test skipped: {reason}"
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_ExplainSample()

    def test_ExplainSample(self):
        logic = MedViTExplainLogic()
        reason = logic.unavailableReason()
        if reason is not None:
            self.skipTest(reason)
        helpers = logic.helpers()
        samplePath = helpers.bundled_sample_ct()
        workDir = None
        if samplePath is None:  # no sample shipped: make a small phantom with the CLI
            workDir = tempfile.mkdtemp(prefix=TEMP_PREFIX + "test-", dir=logic.temporaryRoot())
            args = [*logic.cliCommand(), "make-phantom", workDir, "--seed", "0", "--size", "64", "64", "24"]
            runner = ProcessRunner(args).start()
            runner.wait(300)
            self.assertEqual(runner.returncode, 0, runner.text[-2000:])
            samplePath = os.path.join(workDir, "phantom_000.nii.gz")
        try:
            self.delayDisplay(f"Loading {samplePath}")
            ctNode = slicer.util.loadVolume(str(samplePath))
            self.assertIsNotNone(ctNode)
            storageFile = ctNode.GetStorageNode().GetFileName()

            self.delayDisplay("Explaining (cdam, malignancy) on the CPU")
            result = logic.process(
                ctNode, methods=["cdam"], targets=["malignancy"], device="cpu", batchSize=8, report=False
            )
            self.assertEqual(list(result["maps"]), [("cdam", "malignancy")])
            mapNode = result["maps"][("cdam", "malignancy")]

            # the overlay sits on the CT's voxel grid exactly
            self.assertEqual(mapNode.GetImageData().GetDimensions(), ctNode.GetImageData().GetDimensions())
            ctMatrix, mapMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
            ctNode.GetIJKToRASMatrix(ctMatrix)
            mapNode.GetIJKToRASMatrix(mapMatrix)
            for r in range(4):
                for c in range(4):
                    self.assertAlmostEqual(mapMatrix.GetElement(r, c), ctMatrix.GetElement(r, c), places=4)

            # the module's colour table (transparent centre) and a window from the percentile
            display = mapNode.GetDisplayNode()
            self.assertFalse(display.GetAutoWindowLevel())
            lo, hi = helpers.robust_window(slicer.util.arrayFromVolume(mapNode))
            self.assertAlmostEqual(display.GetWindowLevelMin(), lo, places=4)
            self.assertAlmostEqual(display.GetWindowLevelMax(), hi, places=4)
            rgba = [0.0, 0.0, 0.0, 0.0]
            display.GetColorNode().GetColor(NUMBER_OF_COLORS // 2 if lo < 0 else 0, rgba)
            self.assertEqual(rgba[3], 0.0)  # the centre (value 0) is transparent
            composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
            self.assertEqual(composite.GetForegroundVolumeID(), mapNode.GetID())
            self.assertEqual(composite.GetBackgroundVolumeID(), ctNode.GetID())

            # one score row per slice; the top row is the highest malignancy probability
            dims = ctNode.GetImageData().GetDimensions()
            self.assertEqual(len(result["rows"]), dims[logic.sliceAxis(ctNode)])
            best = max(row["malignancy_prob"] for row in result["rows"])
            self.assertEqual(result["top"]["malignancy_prob"], best)
            self.assertEqual(result["table"].GetNumberOfRows(), len(result["rows"]))

            # data safety: the CT's storage is untouched, the temporary folders go with the scene
            self.assertEqual(ctNode.GetStorageNode().GetFileName(), storageFile)
            self.assertTrue(os.path.isfile(storageFile))
            outputDir = result["outputDir"]
            self.assertTrue(os.path.isdir(outputDir))
            logic.cleanup()
            self.assertFalse(os.path.exists(outputDir))
            self.delayDisplay("Test passed")
        finally:
            removeFolder(workDir)
