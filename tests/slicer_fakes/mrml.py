"""Stand-in MRML: the scene and the node classes the MedViTExplain module touches.

Behaviour follows 3D Slicer's sources (Libs/MRML/Core, Modules/Loadable/*), in what matters to the module:

* ``AddNewNodeByClass`` / ``CreateNodeByClass`` (the latter not in the scene), IDs ``<class><n>``,
  ``GetAttribute`` of an unset name is None, ``GetParameter`` of an unset parameter is "";
  ``StartModify`` / ``EndModify`` defer ``ModifiedEvent`` to the end;
* a volume's voxels are ``[k, j, i]`` (what ``arrayFromVolume`` returns) with an IJK-to-RAS matrix; a
  storage node reads and writes files in LPS through ITK (SimpleITK here), as the archetype storage node
  does, and ``WriteData`` never changes the node it writes;
* a scalar volume display node maps the window ``[min, max]`` through its colour node; a colour legend is
  one more display node of the volume;
* a transformable node has a parent transform; markups report control points in world RAS through it;
* the subject hierarchy gives every data node an item under the scene; folders, studies and patients are
  items; removing a node removes its item;
* ``Clear()`` invokes ``StartCloseEvent`` and ``EndCloseEvent`` and keeps the view nodes.
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from .vtk import vtkCommand, vtkMatrix4x4, vtkObject, vtkTable

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# -- files -------------------------------------------------------------------------------------------
def read_image(path):
    """``(array [k, j, i], ijk_to_ras 4x4)`` of an image file (ITK, LPS on disk)."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction @ np.diag(spacing)
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return array, LPS_FROM_RAS @ ijk_to_lps


def write_image(path, array, ijk_to_ras, compress=True):
    import SimpleITK as sitk

    ijk_to_lps = LPS_FROM_RAS @ np.asarray(ijk_to_ras, dtype=float)
    columns = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    image.SetDirection([float(v) for v in (columns / spacing).ravel()])
    sitk.WriteImage(image, str(path), bool(compress))


# -- nodes -------------------------------------------------------------------------------------------
class vtkImageData(vtkObject):
    def __init__(self, array=None):
        super().__init__()
        self.array = np.zeros((1, 1, 1), np.float32) if array is None else array

    def GetDimensions(self):
        return tuple(int(n) for n in reversed(self.array.shape))

    def GetScalarRange(self):
        return (float(np.nanmin(self.array)), float(np.nanmax(self.array)))


class vtkMRMLNode(vtkObject):
    tag = "Node"

    def __init__(self):
        super().__init__()
        self._id = None
        self._name = ""
        self._scene = None
        self._attributes: dict[str, str] = {}
        self._references: dict[str, list[str]] = {}
        self._singleton = None
        self._disable_modified = 0
        self._pending_modified = False

    def GetID(self):
        return self._id

    def GetName(self):
        return self._name

    def SetName(self, name):
        if name != self._name:
            self._name = name
            self.Modified()

    def GetScene(self):
        return self._scene

    def SetAttribute(self, name, value):
        self._attributes[name] = str(value)

    def GetAttribute(self, name):
        return self._attributes.get(name)

    def SetSingletonTag(self, tag):
        self._singleton = tag

    def GetSingletonTag(self):
        return self._singleton

    def SetHideFromEditors(self, hide):
        self.hideFromEditors = bool(hide)

    def Modified(self):
        if self._disable_modified:
            self._pending_modified = True
        else:
            super().Modified()

    def StartModify(self):
        previous = self._disable_modified
        self._disable_modified = 1
        return previous

    def EndModify(self, previous):
        self._disable_modified = previous
        if not previous and self._pending_modified:
            self._pending_modified = False
            super().Modified()
        return previous

    # node references
    def SetNodeReferenceID(self, role, node_id):
        old = self._references.get(role)
        if node_id:
            self._references[role] = [node_id]
        else:
            self._references.pop(role, None)
        if old != self._references.get(role):
            self.Modified()

    def AddNodeReferenceID(self, role, node_id):
        self._references.setdefault(role, []).append(node_id)
        self.Modified()

    def GetNodeReferenceID(self, role):
        ids = self._references.get(role)
        return ids[0] if ids else None

    def GetNodeReference(self, role):
        node_id = self.GetNodeReferenceID(role)
        return self._scene.GetNodeByID(node_id) if (node_id and self._scene) else None

    def GetNumberOfNodeReferences(self, role):
        return len(self._references.get(role, []))

    def GetNthNodeReference(self, role, n):
        ids = self._references.get(role, [])
        return self._scene.GetNodeByID(ids[n]) if (self._scene and 0 <= n < len(ids)) else None


class vtkMRMLScriptedModuleNode(vtkMRMLNode):
    tag = "ScriptedModule"

    def __init__(self):
        super().__init__()
        self._parameters: dict[str, str] = {}

    def SetParameter(self, name, value):
        value = str(value)
        if self._parameters.get(name) != value:
            self._parameters[name] = value
            self.Modified()

    def GetParameter(self, name):
        return self._parameters.get(name, "")

    def GetParameterNames(self):
        return list(self._parameters)


class vtkMRMLStorageNode(vtkMRMLNode):
    tag = "Storage"

    def __init__(self):
        super().__init__()
        self._file_name = None
        self.UseCompression = 1

    def SetFileName(self, path):
        self._file_name = str(path) if path is not None else None

    def GetFileName(self):
        return self._file_name

    def UseCompressionOff(self):
        self.UseCompression = 0

    def SetUseCompression(self, value):
        self.UseCompression = int(value)


class vtkMRMLVolumeArchetypeStorageNode(vtkMRMLStorageNode):
    tag = "VolumeArchetypeStorage"
    reads: list[str] = []
    writes: list[str] = []

    def __init__(self):
        super().__init__()
        self.SingleFile = 0

    def SetSingleFile(self, value):
        self.SingleFile = int(value)

    def WriteData(self, node):
        """Write the node's voxels and geometry (its own, untransformed) to the file name; the node is
        not changed (no storage node reference, no file name, no modified flag)."""
        if not isinstance(node, vtkMRMLVolumeNode) or node.GetImageData() is None or not self._file_name:
            return 0
        write_image(self._file_name, node.GetImageData().array, node._ijk_to_ras, self.UseCompression)
        type(self).writes.append(self._file_name)
        return 1

    def ReadData(self, node):
        """Read the file into ``node`` (voxels and geometry); 0 when the node is not in a scene or the file
        cannot be read."""
        if not isinstance(node, vtkMRMLVolumeNode) or node.GetScene() is None or not self._file_name:
            return 0
        if not os.path.isfile(self._file_name):
            return 0
        array, ijk_to_ras = read_image(self._file_name)
        node.SetAndObserveImageData(vtkImageData(array))
        node._ijk_to_ras = ijk_to_ras
        node.StorableModified()
        type(self).reads.append(self._file_name)
        return 1


class vtkMRMLStorableNode(vtkMRMLNode):
    def __init__(self):
        super().__init__()
        self._storable_modified = 0

    def SetAndObserveStorageNodeID(self, node_id):
        self.SetNodeReferenceID("storage", node_id)

    def GetStorageNode(self):
        return self.GetNodeReference("storage")

    def GetStorageNodeID(self):
        return self.GetNodeReferenceID("storage")

    def StorableModified(self):
        self._storable_modified += 1


class vtkMRMLTransformableNode(vtkMRMLStorableNode):
    def SetAndObserveTransformNodeID(self, node_id):
        self.SetNodeReferenceID("transform", node_id)

    def GetTransformNodeID(self):
        return self.GetNodeReferenceID("transform")

    def GetParentTransformNode(self):
        return self.GetNodeReference("transform")

    def world_matrix(self):
        """To-world 4x4 of the parent transform chain (identity without one)."""
        matrix = np.eye(4)
        transform = self.GetParentTransformNode()
        while transform is not None:
            matrix = transform._to_parent @ matrix
            transform = transform.GetParentTransformNode()
        return matrix


class vtkMRMLDisplayableNode(vtkMRMLTransformableNode):
    def AddAndObserveDisplayNodeID(self, node_id):
        self.AddNodeReferenceID("display", node_id)
        display = self._scene.GetNodeByID(node_id) if self._scene else None
        if display is not None:
            display._displayable_id = self._id

    def GetDisplayNode(self):
        return self.GetNthDisplayNode(0)

    def GetNumberOfDisplayNodes(self):
        return len([i for i in self._references.get("display", []) if self._scene and self._scene.GetNodeByID(i)])

    def GetNthDisplayNode(self, n):
        nodes = [self._scene.GetNodeByID(i) for i in self._references.get("display", [])] if self._scene else []
        nodes = [d for d in nodes if d is not None]
        return nodes[n] if 0 <= n < len(nodes) else None

    def CreateDefaultDisplayNodes(self):
        pass


class vtkMRMLDisplayNode(vtkMRMLNode):
    tag = "Display"

    def __init__(self):
        super().__init__()
        self._visibility = 1
        self._displayable_id = None

    def SetVisibility(self, visible):
        self._visibility = int(bool(visible))
        self.Modified()

    def GetVisibility(self):
        return self._visibility

    def SetAndObserveColorNodeID(self, node_id):
        self.SetNodeReferenceID("color", node_id)

    def GetColorNodeID(self):
        return self.GetNodeReferenceID("color")

    def GetColorNode(self):
        return self.GetNodeReference("color")

    def GetDisplayableNode(self):
        return self._scene.GetNodeByID(self._displayable_id) if (self._scene and self._displayable_id) else None


class vtkMRMLScalarVolumeDisplayNode(vtkMRMLDisplayNode):
    tag = "ScalarVolumeDisplay"

    def __init__(self):
        super().__init__()
        self._auto_window_level = 1
        self.window, self.level = 256.0, 128.0
        self.apply_threshold = 0
        self.interpolate = 1

    def AutoWindowLevelOff(self):
        self._auto_window_level = 0

    def SetAutoWindowLevel(self, value):
        self._auto_window_level = int(value)

    def GetAutoWindowLevel(self):
        return self._auto_window_level

    def SetWindowLevelMinMax(self, lo, hi):
        self.window, self.level = float(hi) - float(lo), (float(hi) + float(lo)) / 2
        self.Modified()

    def GetWindowLevelMin(self):
        return self.level - self.window / 2

    def GetWindowLevelMax(self):
        return self.level + self.window / 2

    def GetWindow(self):
        return self.window

    def GetLevel(self):
        return self.level

    def SetApplyThreshold(self, value):
        self.apply_threshold = int(value)

    def SetInterpolate(self, value):
        self.interpolate = int(value)


class vtkMRMLColorLegendDisplayNode(vtkMRMLDisplayNode):
    tag = "ColorLegendDisplay"

    def __init__(self):
        super().__init__()
        self.title = ""
        self.label_format = "%.1f"

    def SetTitleText(self, text):
        self.title = text

    def GetTitleText(self):
        return self.title

    def SetLabelFormat(self, text):
        self.label_format = text

    def SetAndObservePrimaryDisplayNode(self, node):
        self.SetNodeReferenceID("primaryDisplay", node.GetID() if node else None)

    def GetPrimaryDisplayNode(self):
        return self.GetNodeReference("primaryDisplay")


class vtkMRMLVolumeNode(vtkMRMLDisplayableNode):
    tag = "Volume"

    def __init__(self):
        super().__init__()
        self._image = None
        self._ijk_to_ras = np.eye(4)

    def GetImageData(self):
        return self._image

    def SetAndObserveImageData(self, image):
        self._image = image
        self.StorableModified()
        self.Modified()

    def GetIJKToRASMatrix(self, matrix):
        matrix.m = np.array(self._ijk_to_ras, dtype=float)

    def SetIJKToRASMatrix(self, matrix):
        self._ijk_to_ras = np.array(matrix.m, dtype=float)
        self.Modified()

    def ApplyTransformMatrix(self, matrix4):
        self._ijk_to_ras = np.asarray(matrix4) @ self._ijk_to_ras


class vtkMRMLScalarVolumeNode(vtkMRMLVolumeNode):
    tag = "Volume"

    def CreateDefaultDisplayNodes(self):
        if self.GetDisplayNode() is not None or self._scene is None:
            return
        display = self._scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        self.AddAndObserveDisplayNodeID(display.GetID())


class vtkMRMLLabelMapVolumeNode(vtkMRMLScalarVolumeNode):
    tag = "LabelMapVolume"


class vtkMRMLColorNode(vtkMRMLStorableNode):
    pass


class vtkMRMLColorTableNode(vtkMRMLColorNode):
    tag = "ColorTable"
    User = 13

    def __init__(self):
        super().__init__()
        self._type = None
        self._colors: list[tuple[float, float, float, float]] = []

    def SetTypeToUser(self):
        self._type = self.User

    def GetType(self):
        return self._type

    def SetNumberOfColors(self, n):
        self._colors = [(0.0, 0.0, 0.0, 0.0)] * int(n)

    def GetNumberOfColors(self):
        return len(self._colors)

    def SetColor(self, entry, *args):
        if args and isinstance(args[0], str):
            args = args[1:]
        if self._type != self.User or not 0 <= entry < len(self._colors) or len(args) not in (3, 4):
            return 0
        r, g, b = (float(v) for v in args[:3])
        a = float(args[3]) if len(args) == 4 else 1.0
        self._colors[entry] = (r, g, b, a)
        self.Modified()
        return 1

    def GetColor(self, entry, rgba):
        if not 0 <= entry < len(self._colors):
            return False
        rgba[:] = list(self._colors[entry])
        return True


class vtkMRMLTableNode(vtkMRMLStorableNode):
    tag = "Table"

    def __init__(self):
        super().__init__()
        self._table = vtkTable()
        self.use_column_name_as_header = False

    def GetTable(self):
        return self._table

    def RemoveAllColumns(self):
        self._table.RemoveAllColumns()
        self.Modified()
        return True

    def AddColumn(self, array):
        self._table.AddColumn(array)
        self.Modified()
        return array

    def SetUseColumnNameAsColumnHeader(self, value):
        self.use_column_name_as_header = bool(value)

    def GetNumberOfRows(self):
        return self._table.GetNumberOfRows()

    def GetNumberOfColumns(self):
        return self._table.GetNumberOfColumns()


class vtkMRMLPlotSeriesNode(vtkMRMLNode):
    tag = "PlotSeries"
    PlotTypeLine, PlotTypeBar, PlotTypeScatter, PlotTypeScatterBar = 0, 1, 2, 3
    MarkerStyleNone, MarkerStyleCross, MarkerStylePlus, MarkerStyleSquare, MarkerStyleCircle = 0, 1, 2, 3, 4

    def __init__(self):
        super().__init__()
        self.x_column = ""
        self.y_column = ""
        self.plot_type = self.PlotTypeLine
        self.marker_style = self.MarkerStyleNone
        self.color = (0.0, 0.0, 0.0)

    def SetAndObserveTableNodeID(self, node_id):
        self.SetNodeReferenceID("table", node_id)

    def GetTableNode(self):
        return self.GetNodeReference("table")

    def SetXColumnName(self, name):
        self.x_column = name

    def GetXColumnName(self):
        return self.x_column

    def SetYColumnName(self, name):
        self.y_column = name

    def GetYColumnName(self):
        return self.y_column

    def SetPlotType(self, value):
        self.plot_type = value

    def SetMarkerStyle(self, value):
        self.marker_style = value

    def SetColor(self, r, g, b):
        self.color = (r, g, b)


class vtkMRMLPlotChartNode(vtkMRMLNode):
    tag = "PlotChart"

    def __init__(self):
        super().__init__()
        self.title = ""
        self.x_axis_title = ""
        self.y_axis_title = ""

    def AddAndObservePlotSeriesNodeID(self, node_id):
        self.AddNodeReferenceID("plotSeries", node_id)

    def HasPlotSeriesNodeID(self, node_id):
        return node_id in self._references.get("plotSeries", [])

    def GetNumberOfPlotSeriesNodes(self):
        return self.GetNumberOfNodeReferences("plotSeries")

    def GetNthPlotSeriesNode(self, n):
        return self.GetNthNodeReference("plotSeries", n)

    def SetTitle(self, text):
        self.title = text

    def SetXAxisTitle(self, text):
        self.x_axis_title = text

    def SetYAxisTitle(self, text):
        self.y_axis_title = text


class vtkMRMLTransformNode(vtkMRMLDisplayableNode):
    tag = "Transform"

    def __init__(self):
        super().__init__()
        self._to_parent = np.eye(4)

    def SetMatrixTransformToParent(self, matrix):
        self._to_parent = np.array(matrix.m, dtype=float)
        self.Modified()

    def GetMatrixTransformToWorld(self, matrix):
        matrix.m = self._to_parent @ self.world_matrix()

    def IsLinear(self):
        return True


class vtkMRMLLinearTransformNode(vtkMRMLTransformNode):
    tag = "LinearTransform"


class vtkMRMLMarkupsNode(vtkMRMLDisplayableNode):
    tag = "Markups"

    def __init__(self):
        super().__init__()
        self._points: list[np.ndarray] = []

    def AddControlPoint(self, *position):
        if len(position) == 1:
            position = tuple(position[0])
        self._points.append(np.array(position[:3], dtype=float))
        self.Modified()
        return len(self._points) - 1

    def GetNumberOfControlPoints(self):
        return len(self._points)

    def GetNthControlPointPosition(self, n, out):
        out[:] = [float(v) for v in self._points[n]]

    def GetNthControlPointPositionWorld(self, n, out):
        world = self.world_matrix() @ np.append(self._points[n], 1.0)
        out[:] = [float(v) for v in world[:3]]


class vtkMRMLMarkupsFiducialNode(vtkMRMLMarkupsNode):
    tag = "MarkupsFiducial"


class vtkMRMLSegmentationNode(vtkMRMLDisplayableNode):
    """Segments as binary masks on a reference grid (the fake keeps only what ``--roi-mask`` needs)."""

    tag = "Segmentation"

    def __init__(self):
        super().__init__()
        self.segments: list[tuple[str, np.ndarray, np.ndarray, bool]] = []

    def add_segment(self, name, mask_kji, ijk_to_ras, visible=True):
        self.segments.append((name, np.asarray(mask_kji, bool), np.asarray(ijk_to_ras, float), visible))


class vtkMRMLSliceNode(vtkMRMLNode):
    tag = "Slice"

    def __init__(self, layout_name=""):
        super().__init__()
        self.layout_name = layout_name
        self.jumps: list[tuple[float, float, float]] = []

    def GetLayoutName(self):
        return self.layout_name

    def JumpSliceByOffsetting(self, r, a, s):
        self.jumps.append((float(r), float(a), float(s)))


class vtkMRMLSliceCompositeNode(vtkMRMLNode):
    tag = "SliceComposite"

    def __init__(self, layout_name=""):
        super().__init__()
        self.layout_name = layout_name
        self.background_id = None
        self.foreground_id = None
        self.foreground_opacity = 0.0

    def GetLayoutName(self):
        return self.layout_name

    def SetBackgroundVolumeID(self, node_id):
        self.background_id = node_id

    def GetBackgroundVolumeID(self):
        return self.background_id

    def SetForegroundVolumeID(self, node_id):
        self.foreground_id = node_id

    def GetForegroundVolumeID(self):
        return self.foreground_id

    def SetForegroundOpacity(self, value):
        self.foreground_opacity = float(value)

    def GetForegroundOpacity(self):
        return self.foreground_opacity


class vtkMRMLLayoutNode(vtkMRMLNode):
    tag = "Layout"
    SlicerLayoutConventionalView = 2
    SlicerLayoutFourUpView = 3
    SlicerLayoutConventionalPlotView = 24
    SlicerLayoutFourUpTableView = 34
    SlicerLayoutFourUpPlotTableView = 38

    def __init__(self):
        super().__init__()
        self.view_arrangement = self.SlicerLayoutConventionalView

    def SetViewArrangement(self, value):
        self.view_arrangement = int(value)

    def GetViewArrangement(self):
        return self.view_arrangement


class vtkMRMLSelectionNode(vtkMRMLNode):
    tag = "Selection"

    def __init__(self):
        super().__init__()
        self.active_table_id = None
        self.active_chart_id = None

    def SetActiveTableID(self, node_id):
        self.active_table_id = node_id

    def GetActiveTableID(self):
        return self.active_table_id

    def SetActivePlotChartID(self, node_id):
        self.active_chart_id = node_id

    def GetActivePlotChartID(self):
        return self.active_chart_id


class vtkMRMLSubjectHierarchyNode(vtkMRMLNode):
    """Items (ints; 0 is invalid) with a parent, a name, attributes and maybe a data node."""

    tag = "SubjectHierarchy"
    INVALID_ITEM_ID = 0

    def __init__(self):
        super().__init__()
        self._ids = itertools.count(2)
        self.items: dict[int, dict] = {}
        self._reset_items()

    def _reset_items(self):
        self.items = {1: {"parent": 0, "name": "Scene", "node": None, "attributes": {}, "level": "Scene"}}

    @staticmethod
    def GetSubjectHierarchyNode(scene):
        return scene._subject_hierarchy

    def GetSceneItemID(self):
        return 1

    def _new(self, parent, name, node=None, level="Folder"):
        item = next(self._ids)
        self.items[item] = {"parent": parent, "name": name, "node": node, "attributes": {}, "level": level}
        return item

    def CreateFolderItem(self, parent, name):
        return self._new(parent, name)

    def CreatePatientItem(self, parent, name):
        return self._new(parent, name, level="Patient")

    def CreateStudyItem(self, parent, name):
        return self._new(parent, name, level="Study")

    def GetItemByDataNode(self, node):
        return next((i for i, item in self.items.items() if item["node"] is node), self.INVALID_ITEM_ID)

    def GetItemDataNode(self, item):
        return self.items[item]["node"] if item in self.items else None

    def GetItemParent(self, item):
        return self.items[item]["parent"] if item in self.items else self.INVALID_ITEM_ID

    def SetItemParent(self, item, parent):
        if item in self.items and parent in self.items:
            self.items[item]["parent"] = parent

    def GetItemChildren(self, parent, id_list, recursive=False):
        id_list.Reset()
        for item, data in self.items.items():
            if data["parent"] == parent:
                id_list.InsertNextId(item)

    def GetItemName(self, item):
        return self.items[item]["name"] if item in self.items else ""

    def SetItemName(self, item, name):
        if item in self.items:
            self.items[item]["name"] = name

    def GetItemLevel(self, item):
        return self.items[item]["level"] if item in self.items else ""

    def SetItemAttribute(self, item, name, value):
        if item in self.items:
            self.items[item]["attributes"][name] = str(value)

    def GetItemAttribute(self, item, name):
        return self.items[item]["attributes"].get(name, "") if item in self.items else ""

    def RemoveItem(self, item):
        self.items.pop(item, None)


# the data node classes that get a subject hierarchy item when added (Slicer's SH plugins)
_SH_DATA = ("vtkMRMLVolumeNode", "vtkMRMLTableNode", "vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode",
            "vtkMRMLMarkupsNode", "vtkMRMLSegmentationNode", "vtkMRMLTransformNode")  # fmt: skip
_VIEW_CLASSES = ("vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode", "vtkMRMLLayoutNode", "vtkMRMLSelectionNode",
                 "vtkMRMLSubjectHierarchyNode")  # fmt: skip


class vtkMRMLScene(vtkObject):
    NodeAddedEvent = 66000
    NodeRemovedEvent = 66001
    StartCloseEvent = 66003
    EndCloseEvent = 66004

    def __init__(self):
        super().__init__()
        self._nodes: dict[str, vtkMRMLNode] = {}
        self._counters: dict[str, int] = {}
        self.removed_listeners: list = []
        self._subject_hierarchy = self.AddNode(vtkMRMLSubjectHierarchyNode())
        self.AddNode(vtkMRMLLayoutNode())
        self.AddNode(vtkMRMLSelectionNode())
        for name in ("Red", "Yellow", "Green"):
            slice_node = vtkMRMLSliceNode(name)
            slice_node.SetName(name)
            self.AddNode(slice_node)
            composite = vtkMRMLSliceCompositeNode(name)
            composite.SetName(name)
            self.AddNode(composite)

    # nodes
    def CreateNodeByClass(self, class_name):
        return NODE_CLASSES[class_name]()

    def AddNode(self, node):
        if node.GetSingletonTag():
            existing = self.GetSingletonNode(node.GetSingletonTag(), node.GetClassName())
            if existing is not None:
                return existing
        class_name = node.GetClassName()
        self._counters[class_name] = self._counters.get(class_name, 0) + 1
        node._id = f"{class_name}{self._counters[class_name]}"
        node._scene = self
        if not node.GetName():
            node._name = self.GenerateUniqueName(node.tag)
        self._nodes[node._id] = node
        if any(node.IsA(c) for c in _SH_DATA):
            sh = self._subject_hierarchy
            sh._new(sh.GetSceneItemID(), node.GetName(), node=node, level="")
        self.InvokeEvent(self.NodeAddedEvent)
        return node

    def AddNewNodeByClass(self, class_name, name=""):
        node = self.CreateNodeByClass(class_name)
        node._name = self.GenerateUniqueName(name) if name else ""
        return self.AddNode(node)

    def RemoveNode(self, node):
        if node is None or node.GetID() not in self._nodes:
            return
        del self._nodes[node.GetID()]
        sh = self._subject_hierarchy
        sh.RemoveItem(sh.GetItemByDataNode(node))
        node._scene = None
        for listener in list(self.removed_listeners):
            listener(node)
        self.InvokeEvent(self.NodeRemovedEvent)

    def GetNodeByID(self, node_id):
        return self._nodes.get(node_id)

    def GetNodes(self):
        return list(self._nodes.values())

    def GetNodesByClass(self, class_name):
        return [n for n in self._nodes.values() if n.IsA(class_name)]

    def GetFirstNodeByClass(self, class_name):
        return next(iter(self.GetNodesByClass(class_name)), None)

    def GetNumberOfNodesByClass(self, class_name):
        return len(self.GetNodesByClass(class_name))

    def GetNthNodeByClass(self, n, class_name):
        nodes = self.GetNodesByClass(class_name)
        return nodes[n] if 0 <= n < len(nodes) else None

    def GetFirstNodeByName(self, name):
        return next((n for n in self._nodes.values() if n.GetName() == name), None)

    def GetSingletonNode(self, tag, class_name):
        return next((n for n in self.GetNodesByClass(class_name) if n.GetSingletonTag() == tag), None)

    def GenerateUniqueName(self, base):
        names = {n.GetName() for n in self._nodes.values()}
        if base not in names:
            return base
        for i in itertools.count(1):
            if f"{base}_{i}" not in names:
                return f"{base}_{i}"

    def Clear(self, remove_singletons=0):
        self.InvokeEvent(self.StartCloseEvent)
        for node in list(self._nodes.values()):
            if not any(node.IsA(c) for c in _VIEW_CLASSES):
                self.RemoveNode(node)
        self._subject_hierarchy._reset_items()
        self.InvokeEvent(self.EndCloseEvent)


NODE_CLASSES = {
    cls.__name__: cls
    for cls in (
        vtkMRMLNode,
        vtkMRMLScriptedModuleNode,
        vtkMRMLVolumeArchetypeStorageNode,
        vtkMRMLScalarVolumeDisplayNode,
        vtkMRMLColorLegendDisplayNode,
        vtkMRMLScalarVolumeNode,
        vtkMRMLLabelMapVolumeNode,
        vtkMRMLColorTableNode,
        vtkMRMLTableNode,
        vtkMRMLPlotSeriesNode,
        vtkMRMLPlotChartNode,
        vtkMRMLLinearTransformNode,
        vtkMRMLMarkupsFiducialNode,
        vtkMRMLSegmentationNode,
        vtkMRMLSliceNode,
        vtkMRMLSliceCompositeNode,
        vtkMRMLLayoutNode,
        vtkMRMLSelectionNode,
        vtkMRMLSubjectHierarchyNode,
    )
}
vtkCommand = vtkCommand
vtkMatrix4x4 = vtkMatrix4x4
