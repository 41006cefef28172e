"""Stand-in ``slicer.util``: what the MedViTExplain module calls, behaving as Base/Python/slicer/util.py.

Dialogs do not block: ``errorDisplay`` / ``infoDisplay`` are recorded in :data:`messages`, the answers of
``confirmOkCancelDisplay`` / ``confirmYesNoDisplay`` come from :data:`answers` (True when empty) and the
questions are recorded too. ``pip_install`` records its arguments in :data:`pip_calls` (or raises what
:data:`pip_error` holds). ``saveNode`` is recorded in :data:`saved` (the module must not use it: it would
re-point a node's storage node).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from types import SimpleNamespace
from warnings import warn

from .. import ctk, mrml, qt

messages: list[tuple[str, str, dict]] = []
questions: list[str] = []
answers: list[bool] = []
pip_calls: list[list[str]] = []
pip_error: list[BaseException] = []
saved: list[tuple[str, str]] = []
module_paths: dict[str, str] = {}


def reset():
    for store in (messages, questions, answers, pip_calls, pip_error, saved):
        store.clear()


def _slicer():
    from .. import slicer

    return slicer


# -- UI ----------------------------------------------------------------------------------------------
def _property_value(prop):
    child = next(iter(prop))
    if child.tag == "string":
        return child.text or ""
    if child.tag == "bool":
        return child.text == "true"
    if child.tag == "number":
        return int(child.text)
    if child.tag == "double":
        return float(child.text)
    if child.tag == "stringlist":
        return [s.text or "" for s in child]
    if child.tag in ("enum", "set", "cstring"):
        return child.text
    return None  # rect, size, ... (layout only)


def loadUI(path):
    """Build the widgets a Qt Designer file names (as QUiLoader would), with their properties."""
    if not os.path.isfile(path):
        raise RuntimeError(f"Could not load UI file: file not found {path}\n\n")
    root_element = ET.parse(path).getroot().find("widget")
    classes = {**qt.WIDGET_CLASSES, **ctk.WIDGET_CLASSES, **_slicer().WIDGET_CLASSES}
    widgets = {}

    def build(element):
        cls = classes.get(element.get("class"))
        if cls is None:
            raise RuntimeError(f"the stand-in Qt has no {element.get('class')} (used by {element.get('name')})")
        widget = cls()
        widget.name = widget.objectName = element.get("name")
        for prop in element.findall("property"):
            value = _property_value(prop)
            if value is None:
                continue
            name = prop.get("name")
            if name == "filters":
                continue
            if name in ("text", "toolTip", "title") or not isinstance(value, str):
                setattr(widget, name, value)
        for item in element.findall("item"):  # QComboBox items
            text = item.find("property/string")
            if text is not None:
                widget.addItem(text.text or "")
        widgets[widget.name] = widget
        for child in _child_widgets(element):
            widget._children.append(build(child))
        return widget

    root = build(root_element)
    for connection in ET.parse(path).getroot().iter("connection"):
        if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)":
            root.scene_receivers.append(widgets[connection.findtext("receiver")])
    root.all_widgets = widgets
    return root


def _child_widgets(element):
    """The widgets directly inside ``element`` (through its layouts and layout items)."""
    for sub in element:
        if sub.tag == "widget":
            yield sub
        elif sub.tag in ("layout", "item"):
            yield from _child_widgets(sub)


def childWidgetVariables(widget):
    return SimpleNamespace(**widget.all_widgets)


def modulePath(module_name):
    return module_paths[module_name]


# -- scene helpers -----------------------------------------------------------------------------------
def getNodesByClass(class_name, scene=None):
    return list((scene or _slicer().mrmlScene).GetNodesByClass(class_name))


def getNode(pattern):
    node = _slicer().mrmlScene.GetFirstNodeByName(pattern) or _slicer().mrmlScene.GetNodeByID(pattern)
    if node is None:
        raise _slicer().util.MRMLNodeNotFoundException(pattern)
    return node


class MRMLNodeNotFoundException(Exception):
    pass


def arrayFromVolume(volume_node):
    if volume_node.GetClassName() not in ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode"):
        raise RuntimeError("Unsupported volume type: " + volume_node.GetClassName())
    return volume_node.GetImageData().array


def loadVolume(path, properties=None):
    """Load a volume file as Slicer does: a scalar volume node named after the file, a storage node that
    points at the file, a display node."""
    slicer = _slicer()
    properties = dict(properties or {})
    name = properties.get("name") or os.path.basename(str(path)).split(".")[0]
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    if not storage.ReadData(node):
        slicer.mrmlScene.RemoveNode(node)
        slicer.mrmlScene.RemoveNode(storage)
        raise RuntimeError(f"Failed to load volume from {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node._storable_modified = 0  # just read: not modified since read
    node.CreateDefaultDisplayNodes()
    return node


def saveNode(node, filename, properties=None):
    """Recorded; as in Slicer it would point the node's storage node at ``filename``."""
    saved.append((node.GetID(), str(filename)))
    storage = node.GetStorageNode()
    if storage is None:
        storage = _slicer().mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(filename))
    return bool(storage.WriteData(node))


def setSliceViewerLayers(
    background="keep-current",
    foreground="keep-current",
    label="keep-current",
    foregroundOpacity=None,
    labelOpacity=None,
    fit=False,
    rotateToVolumePlane=False,
):
    def node_id(node_or_id):
        return node_or_id.GetID() if isinstance(node_or_id, mrml.vtkMRMLNode) else node_or_id

    for composite in _slicer().mrmlScene.GetNodesByClass("vtkMRMLSliceCompositeNode"):
        if background != "keep-current":
            composite.SetBackgroundVolumeID(node_id(background))
        if foreground != "keep-current":
            composite.SetForegroundVolumeID(node_id(foreground))
        if foregroundOpacity is not None:
            composite.SetForegroundOpacity(foregroundOpacity)


def startupEnvironment():
    """The environment Slicer was started with (here: this process's)."""
    return dict(os.environ)


# -- dialogs -----------------------------------------------------------------------------------------
def errorDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    messages.append(("error", text, kwargs))


def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    messages.append(("info", text, kwargs))


def warningDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs):
    messages.append(("warning", text, kwargs))


def delayDisplay(message, autoCloseMsec=1000, parent=None, **kwargs):
    messages.append(("delay", message, kwargs))


def _answer(text):
    questions.append(text)
    return answers.pop(0) if answers else True


def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
    return _answer(text)


def confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs):
    return _answer(text)


class WaitCursor:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def pip_install(requirements, **kwargs):
    pip_calls.append(list(requirements) if isinstance(requirements, list) else requirements.split())
    if pip_error:
        raise pip_error.pop(0)


# -- observations ------------------------------------------------------------------------------------
class VTKObservationMixin:
    """As slicer.util.VTKObservationMixin: one observation per (object, event, method)."""

    def __init__(self):
        super().__init__()
        self.__observations: dict = {}

    def addObserver(self, obj, event, method, group="none", priority=0.0):
        methods = self.__observations.setdefault(obj, {}).setdefault(event, {})
        if method in methods:
            warn("already has observer", stacklevel=2)
            return
        methods[method] = (group, obj.AddObserver(event, method, priority), priority)

    def removeObserver(self, obj, event, method):
        try:
            _group, tag, _priority = self.__observations[obj][event].pop(method)
        except KeyError:
            warn("does not have observer", stacklevel=2)
            return
        obj.RemoveObserver(tag)

    def removeObservers(self, method=None):
        for obj, events in list(self.__observations.items()):
            for _event, methods in events.items():
                for m, (_g, tag, _p) in list(methods.items()):
                    if method is None or m == method:
                        obj.RemoveObserver(tag)
                        methods.pop(m)
        if method is None:
            self.__observations.clear()

    def hasObserver(self, obj, event, method):
        return method in self.__observations.get(obj, {}).get(event, {})
