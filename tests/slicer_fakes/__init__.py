"""Stand-in ``slicer``, ``qt``, ``vtk`` and ``ctk`` modules for running 3D Slicer scripted modules in CI.

They hold just what ``plugins/slicer/MedViTExplain/MedViTExplain.py`` touches and behave as 3D Slicer's
sources (5.6 to 5.10) show: PythonQt signals and properties, ``QTimer`` driven by
``slicer.app.processEvents()``, MRML nodes and the scene, storage nodes that read and write real files
(SimpleITK), the subject hierarchy, ``slicer.util``'s helpers and dialogs (recorded, never blocking) and
the ``ScriptedLoadableModule`` base classes. Each module says which behaviours it keeps.

Use::

    with installed(tmp_path) as slicer:      # puts them in sys.modules, removes them afterwards
        module = load_module(path)            # the real module file, imported against the fakes
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

NAMES = ("qt", "vtk", "ctk", "slicer", "slicer.util", "slicer.ScriptedLoadableModule")


def modules():
    from . import ctk, qt, vtk
    from . import slicer as slicer_module
    from .slicer import ScriptedLoadableModule, util

    return {
        "qt": qt,
        "vtk": vtk,
        "ctk": ctk,
        "slicer": slicer_module,
        "slicer.util": util,
        "slicer.ScriptedLoadableModule": ScriptedLoadableModule,
    }


@contextlib.contextmanager
def installed(temporary_path, version=(5, 8)):
    """Put the fakes in ``sys.modules`` (restoring what was there), with a fresh app and scene."""
    fakes = modules()
    saved = {name: sys.modules.get(name) for name in NAMES}
    sys.modules.update(fakes)
    fakes["slicer"].util = fakes["slicer.util"]
    fakes["slicer"].ScriptedLoadableModule = fakes["slicer.ScriptedLoadableModule"]
    fakes["slicer"].reset(temporary_path, version)
    try:
        yield fakes["slicer"]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_module(path, name=None):
    """Import a scripted module file (e.g. ``MedViTExplain.py``) against the installed fakes."""
    path = Path(path)
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    sys.modules["slicer.util"].module_paths[name] = str(path)
    return module
