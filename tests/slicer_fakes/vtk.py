"""Stand-in ``vtk``: what the MedViTExplain module and the fake MRML touch, behaving as VTK does.

``vtkObject`` observers (``AddObserver`` returns a tag, ``RemoveObserver(tag)``, callbacks get
``(caller, event)``), ``vtkMatrix4x4`` (row-major elements, ``MultiplyPoint`` on a homogeneous point),
value arrays, ``vtkIdList``, ``vtkCollection`` and a column table.
"""

from __future__ import annotations

import itertools

import numpy as np


class vtkCommand:
    ModifiedEvent = 33
    AnyEvent = 0


class vtkObject:
    _tags = itertools.count(1)

    def __init__(self):
        self._observers: dict[int, tuple[object, object, float]] = {}

    def GetClassName(self):
        return type(self).__name__

    def IsA(self, name):
        return any(cls.__name__ == name for cls in type(self).__mro__)

    def AddObserver(self, event, callback, priority=0.0):
        tag = next(self._tags)
        self._observers[tag] = (event, callback, priority)
        return tag

    def RemoveObserver(self, tag):
        self._observers.pop(tag, None)

    def HasObserver(self, event):
        return any(e == event for e, _, _ in self._observers.values())

    def InvokeEvent(self, event, calldata=None):
        for e, callback, _ in sorted(list(self._observers.values()), key=lambda o: -o[2]):
            if e == event or e == vtkCommand.AnyEvent:
                callback(self, event)

    def Modified(self):
        self.InvokeEvent(vtkCommand.ModifiedEvent)

    def Register(self, _other=None):
        pass

    def UnRegister(self, _other=None):
        pass


class vtkMatrix4x4(vtkObject):
    def __init__(self):
        super().__init__()
        self.m = np.eye(4)

    def GetElement(self, r, c):
        return float(self.m[r, c])

    def SetElement(self, r, c, value):
        self.m[r, c] = value

    def DeepCopy(self, other):
        self.m = np.array(other.m, dtype=float)

    def Identity(self):
        self.m = np.eye(4)

    def Invert(self):
        self.m = np.linalg.inv(self.m)

    def MultiplyPoint(self, point):
        return tuple(float(v) for v in self.m @ np.asarray(point, dtype=float))

    @staticmethod
    def Multiply4x4(a, b, out):
        out.m = a.m @ b.m

    @classmethod
    def from_array(cls, array):
        matrix = cls()
        matrix.m = np.array(array, dtype=float)
        return matrix


class vtkAbstractArray(vtkObject):
    def __init__(self):
        super().__init__()
        self._name = None
        self._values: list = []

    def SetName(self, name):
        self._name = name

    def GetName(self):
        return self._name

    def InsertNextValue(self, value):
        self._values.append(self._convert(value))
        return len(self._values) - 1

    def GetValue(self, i):
        return self._values[i]

    def SetValue(self, i, value):
        self._values[i] = self._convert(value)

    def GetNumberOfValues(self):
        return len(self._values)

    def GetNumberOfTuples(self):
        return len(self._values)

    @staticmethod
    def _convert(value):
        return value


class vtkDoubleArray(vtkAbstractArray):
    @staticmethod
    def _convert(value):
        return float(value)


class vtkIdTypeArray(vtkAbstractArray):
    @staticmethod
    def _convert(value):
        return int(value)


class vtkStringArray(vtkAbstractArray):
    @staticmethod
    def _convert(value):
        return str(value)


class vtkIdList(vtkObject):
    def __init__(self):
        super().__init__()
        self._ids: list[int] = []

    def InsertNextId(self, i):
        self._ids.append(int(i))

    def GetNumberOfIds(self):
        return len(self._ids)

    def GetId(self, i):
        return self._ids[i]

    def Reset(self):
        self._ids = []


class vtkCollection(vtkObject):
    def __init__(self):
        super().__init__()
        self._items: list = []

    def AddItem(self, item):
        self._items.append(item)

    def GetNumberOfItems(self):
        return len(self._items)

    def GetItemAsObject(self, i):
        return self._items[i] if 0 <= i < len(self._items) else None


class vtkTable(vtkObject):
    """Columns of equal length (``vtkTable``); ``AddColumn`` of a longer array grows every column."""

    def __init__(self):
        super().__init__()
        self._columns: list[vtkAbstractArray] = []

    def AddColumn(self, array):
        self._columns.append(array)

    def RemoveAllColumns(self):
        self._columns = []

    def GetNumberOfColumns(self):
        return len(self._columns)

    def GetNumberOfRows(self):
        return max((c.GetNumberOfValues() for c in self._columns), default=0)

    def GetColumn(self, i):
        return self._columns[i]

    def GetColumnByName(self, name):
        return next((c for c in self._columns if c.GetName() == name), None)

    def GetColumnName(self, i):
        return self._columns[i].GetName()
