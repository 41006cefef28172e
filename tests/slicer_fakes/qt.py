"""Stand-in ``qt`` (PythonQt as 3D Slicer exposes it): what the MedViTExplain module and its .ui file use.

PythonQt semantics kept here:

* signals are connected by signature, ``widget.connect("valueChanged(double)", slot)``; a slot may take
  fewer arguments than the signal sends (PythonQt drops the rest);
* Qt properties are attributes (``button.enabled = False``, ``slider.value``, ``listWidget.count``);
  setting a value property emits its change signal only when the value changes, as Qt does;
* ``QTimer`` only fires while the event loop runs: here, when ``slicer.app.processEvents()`` is called
  (:func:`process_events`), never on its own thread.
"""

from __future__ import annotations

import inspect
import time

# -- signals -----------------------------------------------------------------------------------------


def _normalize(signature: str) -> str:
    return "".join(signature.split())


def _call(slot, args):
    try:
        params = list(inspect.signature(slot).parameters.values())
    except (TypeError, ValueError):
        return slot(*args)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return slot(*args)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return slot(*args[: len(positional)])


class QObject:
    def __init__(self, parent=None):
        self._slots: dict[str, list] = {}
        self._blocked = False
        self.name = ""
        self.objectName = ""

    def connect(self, signal, slot):
        self._slots.setdefault(_normalize(signal), []).append(slot)
        return True

    def disconnect(self, signal, slot=None):
        key = _normalize(signal)
        if slot is None:
            self._slots.pop(key, None)
        elif slot in self._slots.get(key, []):
            self._slots[key].remove(slot)
        return True

    def blockSignals(self, block):
        previous, self._blocked = self._blocked, bool(block)
        return previous

    def emit(self, signal, *args):
        if self._blocked:
            return
        for slot in list(self._slots.get(_normalize(signal), [])):
            _call(slot, args)


# -- event loop and timers ---------------------------------------------------------------------------
_active_timers: list[QTimer] = []


def process_events():
    """Run every active timer that is due (what Qt's event loop does between two user events)."""
    now = time.monotonic()
    for timer in list(_active_timers):
        if timer in _active_timers and timer._due <= now:
            if timer.singleShot_:
                timer.stop()
            else:
                timer._due = now + timer.interval / 1000.0
            timer.emit("timeout()")


def reset():
    _active_timers.clear()
    QSettings._store.clear()
    QDesktopServices.opened.clear()


class QTimer(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.interval = 0
        self.singleShot_ = False
        self._due = 0.0

    def setInterval(self, msec):
        self.interval = int(msec)

    def setSingleShot(self, single):
        self.singleShot_ = bool(single)

    def start(self, msec=None):
        if msec is not None:
            self.interval = int(msec)
        self._due = time.monotonic() + self.interval / 1000.0
        if self not in _active_timers:
            _active_timers.append(self)

    def stop(self):
        if self in _active_timers:
            _active_timers.remove(self)

    def isActive(self):
        return self in _active_timers

    @staticmethod
    def singleShot(msec, callback):
        timer = QTimer()
        timer.singleShot_ = True
        timer.connect("timeout()", callback)
        timer.start(msec)
        return timer


# -- settings, urls ----------------------------------------------------------------------------------
class QSettings:
    """Application settings (one store per test run, like one user's Slicer.ini)."""

    _store: dict[str, object] = {}

    def value(self, key, default=None):
        return self._store.get(key, default)

    def setValue(self, key, value):
        self._store[key] = value

    def contains(self, key):
        return key in self._store

    def remove(self, key):
        self._store.pop(key, None)


class QUrl:
    def __init__(self, text=""):
        self._text = text

    @staticmethod
    def fromLocalFile(path):
        url = QUrl("file://" + str(path))
        url.localFile = str(path)
        return url

    def toString(self):
        return self._text


class QDesktopServices:
    opened: list[QUrl] = []

    @staticmethod
    def openUrl(url):
        QDesktopServices.opened.append(url)
        return True


class QIcon:
    def __init__(self, path=""):
        self.path = path


class Qt:
    WaitCursor = 3
    Vertical = 2
    Horizontal = 1


# -- widgets -----------------------------------------------------------------------------------------
class QWidget(QObject):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.enabled = True
        self.visible = True
        self.toolTip = ""
        self._children: list[QWidget] = []

    def setEnabled(self, enabled):
        self.enabled = bool(enabled)

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def layout(self):
        if not hasattr(self, "_layout"):
            self._layout = QVBoxLayout()
        return self._layout

    def setLayout(self, layout):
        self._layout = layout

    def findChildren(self):
        return list(self._children)


class QVBoxLayout:
    def __init__(self, parent=None):
        self.widgets: list[QWidget] = []

    def addWidget(self, widget):
        self.widgets.append(widget)

    def addStretch(self, *_):
        pass


QHBoxLayout = QVBoxLayout
QFormLayout = QVBoxLayout


class QLabel(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text
        self.wordWrap = False


class QPushButton(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text
        self.checkable = False
        self.checked = False

    def click(self):
        """What a user's click does: nothing when disabled, else ``clicked(bool)``."""
        if self.enabled and self.visible:
            self.emit("clicked(bool)", self.checked)


class QCheckBox(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text
        self._checked = False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        value = bool(value)
        if value != self._checked:
            self._checked = value
            self.emit("toggled(bool)", value)

    def click(self):
        if self.enabled and self.visible:
            self.checked = not self.checked
            self.emit("clicked(bool)", self.checked)


class QProgressBar(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum = 0
        self._maximum = 100
        self._value = 0
        self.history: list[tuple[int, int]] = []  # (value, maximum) after every change

    @property
    def maximum(self):
        return self._maximum

    @maximum.setter
    def maximum(self, value):
        self._maximum = int(value)
        self.history.append((self._value, self._maximum))

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = int(value)
        if value != self._value:
            self._value = value
            self.history.append((self._value, self._maximum))
            self.emit("valueChanged(int)", value)


class QSpinBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum = 0
        self.maximum = 99
        self._value = 0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = int(min(max(int(value), self.minimum), self.maximum))
        if value != self._value:
            self._value = value
            self.emit("valueChanged(int)", value)


class QComboBox(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._items: list[str] = []
        self._index = -1

    def addItem(self, text):
        self._items.append(str(text))
        if self._index < 0:
            self.currentIndex = 0

    def clear(self):
        self._items = []
        self.currentIndex = -1

    @property
    def count(self):
        return len(self._items)

    def findText(self, text):
        return self._items.index(text) if text in self._items else -1

    def itemText(self, i):
        return self._items[i]

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        index = int(index) if -1 <= int(index) < len(self._items) else -1
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged(int)", index)
            self.emit("currentTextChanged(QString)", self.currentText)

    @property
    def currentText(self):
        return self._items[self._index] if self._index >= 0 else ""

    @currentText.setter
    def currentText(self, text):
        if text in self._items:
            self.currentIndex = self._items.index(text)


class QListWidgetItem:
    def __init__(self, text=""):
        self._text = str(text)
        self._selected = False
        self._tooltip = ""
        self._list = None

    def text(self):
        return self._text

    def setToolTip(self, text):
        self._tooltip = text

    def toolTip(self):
        return self._tooltip

    def isSelected(self):
        return self._selected

    def setSelected(self, selected):
        selected = bool(selected)
        if selected != self._selected:
            self._selected = selected
            if self._list is not None:
                self._list.emit("itemSelectionChanged()")


class QListWidget(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._items: list[QListWidgetItem] = []

    def addItem(self, item):
        if not isinstance(item, QListWidgetItem):
            item = QListWidgetItem(item)
        item._list = self
        self._items.append(item)
        if item._selected:
            self.emit("itemSelectionChanged()")

    def clear(self):
        had_selection = any(i.isSelected() for i in self._items)
        for item in self._items:
            item._list = None
        self._items = []
        if had_selection:
            self.emit("itemSelectionChanged()")

    @property
    def count(self):
        return len(self._items)

    def item(self, i):
        return self._items[i] if 0 <= i < len(self._items) else None

    def selectedItems(self):
        return [i for i in self._items if i.isSelected()]

    def findItems(self, text, _flags=0):
        return [i for i in self._items if i.text() == text]


WIDGET_CLASSES = {
    cls.__name__: cls
    for cls in (QWidget, QLabel, QPushButton, QCheckBox, QProgressBar, QSpinBox, QComboBox, QListWidget)
}
