"""Stand-in ``slicer``: ``slicer.app``, ``slicer.mrmlScene``, ``slicer.modules`` logics, the MRML classes,
``qMRMLWidget`` / ``qMRMLNodeComboBox`` and ``vtkSlicerTransformLogic``; ``slicer.util`` and
``slicer.ScriptedLoadableModule`` are submodules. :func:`reset` makes a fresh application and scene.
"""

from __future__ import annotations

import numpy as np

from .. import mrml, qt
from ..mrml import *  # noqa: F403 - the MRML classes are slicer.vtkMRML*, as in Slicer
from ..qt import QWidget

app = None
mrmlScene = None
modules = None
selfTests: dict = {}


# -- widgets -----------------------------------------------------------------------------------------
class qMRMLWidget(QWidget):
    """The .ui root: ``setMRMLScene`` reaches the node selectors its ``<connections>`` name."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.scene_receivers: list = []
        self.mrmlScene = None

    def setMRMLScene(self, scene):
        self.mrmlScene = scene
        for receiver in self.scene_receivers:
            receiver.setMRMLScene(scene)


class qMRMLNodeComboBox(QWidget):
    """A node selector: only nodes of ``nodeTypes`` (and the added attribute filters) in its scene can be
    current; the current node becomes None when it leaves the scene; ``currentNodeChanged`` on change."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.nodeTypes: list[str] = []
        self.noneEnabled = False
        self.addEnabled = False
        self.removeEnabled = False
        self.showChildNodeTypes = True
        self._attributes: list[tuple[str, str, str]] = []
        self._scene = None
        self._current = None

    def setMRMLScene(self, scene):
        self._scene = scene
        if scene is not None:
            scene.removed_listeners.append(self._on_node_removed)

    def mrmlScene(self):
        return self._scene

    def addAttribute(self, node_type, name, value=""):
        self._attributes.append((node_type, name, str(value)))

    def accepts(self, node):
        if node is None:
            return True
        if self._scene is None or self._scene.GetNodeByID(node.GetID()) is not node:
            return False
        if not any(node.IsA(t) for t in self.nodeTypes):
            return False
        return all(not node.IsA(t) or node.GetAttribute(name) == value for t, name, value in self._attributes)

    def nodes(self):
        return [n for n in (self._scene.GetNodes() if self._scene else []) if self.accepts(n)]

    def currentNode(self):
        return self._current

    @property
    def currentNodeID(self):
        return self._current.GetID() if self._current is not None else ""

    def setCurrentNode(self, node):
        if not self.accepts(node):
            return
        if node is not self._current:
            self._current = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)
            self.emit("currentNodeIDChanged(QString)", self.currentNodeID)

    def setCurrentNodeID(self, node_id):
        self.setCurrentNode(self._scene.GetNodeByID(node_id) if (self._scene and node_id) else None)

    def _on_node_removed(self, node):
        if node is self._current:
            self.setCurrentNode(None)


WIDGET_CLASSES = {"qMRMLWidget": qMRMLWidget, "qMRMLNodeComboBox": qMRMLNodeComboBox}


# -- application -------------------------------------------------------------------------------------
class _PlotView(qt.QObject):
    def select(self, series_id, point_ids):
        """What a click on a chart point does: ``dataSelected(vtkStringArray*, vtkCollection*)``."""
        from ..vtk import vtkCollection, vtkIdTypeArray, vtkStringArray

        ids, selection = vtkStringArray(), vtkCollection()
        ids.InsertNextValue(series_id)
        points = vtkIdTypeArray()
        for p in point_ids:
            points.InsertNextValue(p)
        selection.AddItem(points)
        self.emit("dataSelected(vtkStringArray*,vtkCollection*)", ids, selection)


class _PlotWidget:
    def __init__(self):
        self.view = _PlotView()

    def plotView(self):
        return self.view


class _SliceWidget:
    def __init__(self, name):
        self.name = name

    def mrmlSliceCompositeNode(self):
        return next(n for n in mrmlScene.GetNodesByClass("vtkMRMLSliceCompositeNode") if n.GetLayoutName() == self.name)

    def mrmlSliceNode(self):
        return next(n for n in mrmlScene.GetNodesByClass("vtkMRMLSliceNode") if n.GetLayoutName() == self.name)


class _LayoutManager:
    PLOT_LAYOUTS = (24, 38)

    def __init__(self):
        self._plot_widget = _PlotWidget()

    @property
    def layout(self):
        return mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement()

    def setLayout(self, value):
        mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode").SetViewArrangement(value)

    def sliceWidget(self, name):
        return _SliceWidget(name)

    def plotWidget(self, index):
        """The plot view widget, only while the layout has a plot view (as in Slicer)."""
        return self._plot_widget if (index == 0 and self.layout in self.PLOT_LAYOUTS) else None


class _ApplicationLogic:
    def __init__(self):
        self.propagated_tables = 0
        self.propagated_charts = 0

    def GetSelectionNode(self):
        return mrmlScene.GetFirstNodeByClass("vtkMRMLSelectionNode")

    def PropagateTableSelection(self):
        self.propagated_tables += 1

    def PropagatePlotChartSelection(self):
        self.propagated_charts += 1


class _Application:
    def __init__(self, temporary_path, version=(5, 8)):
        self.temporaryPath = str(temporary_path)
        self.majorVersion, self.minorVersion = version
        self._layout_manager = _LayoutManager()
        self._application_logic = _ApplicationLogic()
        self.process_events_calls = 0

    def processEvents(self):
        self.process_events_calls += 1
        qt.process_events()

    def layoutManager(self):
        return self._layout_manager

    def applicationLogic(self):
        return self._application_logic

    def testingEnabled(self):
        return True


class _ColorsLogic:
    @staticmethod
    def AddDefaultColorLegendDisplayNode(displayable):
        """The volume's colour legend display node (made once, then returned), as vtkSlicerColorLogic."""
        display = displayable.GetDisplayNode() if displayable is not None else None
        if display is None:
            return None
        for i in range(displayable.GetNumberOfDisplayNodes()):
            existing = displayable.GetNthDisplayNode(i)
            if existing.IsA("vtkMRMLColorLegendDisplayNode") and existing.GetPrimaryDisplayNode() is display:
                return existing
        legend = mrmlScene.AddNewNodeByClass("vtkMRMLColorLegendDisplayNode", displayable.GetName() + " color legend")
        legend.SetTitleText(displayable.GetName())
        legend.SetAndObservePrimaryDisplayNode(display)
        displayable.AddAndObserveDisplayNodeID(legend.GetID())
        return legend


class _PlotsLogic:
    @staticmethod
    def ShowChartInLayout(chart):
        layout = mrmlScene.GetFirstNodeByClass("vtkMRMLLayoutNode")
        if layout.GetViewArrangement() not in _LayoutManager.PLOT_LAYOUTS:
            layout.SetViewArrangement(vtkMRMLLayoutNode.SlicerLayoutConventionalPlotView)  # noqa: F405
        app.applicationLogic().GetSelectionNode().SetActivePlotChartID(chart.GetID() if chart else None)
        app.applicationLogic().PropagatePlotChartSelection()


class _SegmentationsLogic:
    @staticmethod
    def ExportVisibleSegmentsToLabelmapNode(segmentation, labelmap, reference):
        """Visible segments → labels 1..n on the reference volume's grid (the fake needs segments that
        are already on that grid)."""
        reference_matrix = reference._ijk_to_ras
        shape = reference.GetImageData().array.shape
        labels = np.zeros(shape, np.int16)
        label = 0
        for _name, mask, ijk_to_ras, visible in segmentation.segments:
            if not visible:
                continue
            if mask.shape != shape or not np.allclose(ijk_to_ras, reference_matrix):
                return False
            label += 1
            labels[mask] = label
        labelmap.SetAndObserveImageData(mrml.vtkImageData(labels))
        labelmap._ijk_to_ras = np.array(reference_matrix)
        return True


class _Module:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


class _Modules:
    def __init__(self):
        self.colors = _Module(_ColorsLogic())
        self.plots = _Module(_PlotsLogic())
        self.segmentations = _Module(_SegmentationsLogic())


class vtkSlicerTransformLogic:
    @staticmethod
    def hardenTransform(node):
        """Apply the node's parent transforms to it and remove the parent (a linear chain here)."""
        if node.GetParentTransformNode() is None:
            return True
        if hasattr(node, "ApplyTransformMatrix"):
            node.ApplyTransformMatrix(node.world_matrix())
        elif hasattr(node, "_points"):
            node._points = [(node.world_matrix() @ np.append(p, 1.0))[:3] for p in node._points]
        node.SetAndObserveTransformNodeID(None)
        return True


def reset(temporary_path, version=(5, 8)):
    """A fresh application (Slicer ``version``, temporary folder) and an empty scene."""
    global app, mrmlScene, modules
    qt.reset()
    selfTests.clear()
    mrmlScene = mrml.vtkMRMLScene()
    app = _Application(temporary_path, version)
    modules = _Modules()
    from . import util

    util.reset()
