"""Stand-in ``ctk``: the CTK widgets the MedViTExplain .ui file uses (PythonQt property semantics)."""

from __future__ import annotations

from .qt import QWidget


class ctkCollapsibleButton(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.text = ""
        self.collapsed = False


class ctkSliderWidget(QWidget):
    """A double slider with a spin box: ``value`` is clamped to [minimum, maximum]; ``valueChanged(double)``
    on change."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum = 0.0
        self.maximum = 99.0
        self.singleStep = 1.0
        self.pageStep = 10.0
        self.suffix = ""
        self._value = 0.0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = float(min(max(float(value), self.minimum), self.maximum))
        if value != self._value:
            self._value = value
            self.emit("valueChanged(double)", value)


class ctkPathLineEdit(QWidget):
    """A path field: ``currentPath``; ``currentPathChanged(QString)`` on change."""

    Dirs, Files, Readable, Writable, Executable = 1, 2, 4, 8, 16

    def __init__(self, parent=None):
        super().__init__(parent)
        self.filters = 0
        self._path = ""

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, path):
        path = str(path or "")
        if path != self._path:
            self._path = path
            self.emit("currentPathChanged(QString)", path)


WIDGET_CLASSES = {cls.__name__: cls for cls in (ctkCollapsibleButton, ctkSliderWidget, ctkPathLineEdit)}
