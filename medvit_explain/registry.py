"""The one registry of explanation methods.

A method is one class (a subclass of :class:`medvit_explain.explainers.Explainer` that declares its
name, title, citation, kind, options, …) in one file:

* built-in methods live in ``medvit_explain/explainers/`` and are registered with :func:`register`;
  every module of that package is imported when the registry is first read, so a new file is enough;
* a package of yours registers its methods through the entry-point group ``medvit_explain.explainers``
  (``name = module:Class`` in its ``entry_points.txt``), loaded the same way.

The registry is read lazily (the first call of :func:`method_names`, :func:`explainer_class` or
:func:`list_methods` imports the explainers, and so torch), so importing this module and the CLI's
``--help`` stay light. ``list-methods``, the CLI's ``--method``, ``explain``, ``explain_volume``,
``batch``, ``evaluate``, ``audit``, the bench and the napari widget read it here; the Slicer module reads
it through ``medvit-explain list-methods --json``.
"""

from __future__ import annotations

import importlib
import re
import threading
import warnings
from typing import Any

from .errors import MedvitWarning

__all__ = [
    "ENTRY_POINT_GROUP",
    "explainer_class",
    "list_methods",
    "method_info",
    "method_names",
    "register",
]

ENTRY_POINT_GROUP = "medvit_explain.explainers"
BUILT_IN_PACKAGE = "medvit_explain.explainers"  # loaded by name, like the plugins
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")  # no "_": overlay file names are split at "_"

_REGISTRY: dict[str, type] = {}
_LOCK = threading.RLock()
_LOADED = False


def register(cls: type) -> type:
    """Class decorator: add an :class:`~medvit_explain.explainers.Explainer` subclass to the registry.

    Raises ``TypeError`` for a class that is not an explainer, ``ValueError`` for a bad name, kind or
    space, or a name already taken by another class."""
    from .explainers.base import KINDS, SPACES, Explainer

    if not (isinstance(cls, type) and issubclass(cls, Explainer)):
        raise TypeError(f"expected a subclass of medvit_explain.explainers.Explainer, got {cls!r}")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(f"{cls.__name__}.name: expected lower-case letters, digits and '-', got {name!r}")
    if cls.kind not in KINDS or cls.space not in SPACES:
        raise ValueError(
            f"{cls.__name__}: expected kind in {KINDS} and space in {SPACES}, got {cls.kind!r} and {cls.space!r}"
        )
    if not cls.title or not cls.citation:
        raise ValueError(f"{cls.__name__}: expected a title and a citation")
    with _LOCK:
        other = _REGISTRY.get(name)
        if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is taken by {other.__module__}.{other.__qualname__}")
        _REGISTRY[name] = cls
    return cls


def _load() -> dict[str, type]:
    """The registry, loaded on first use: the built-in methods, then the entry-point plugins."""
    global _LOADED
    with _LOCK:
        if not _LOADED:
            _LOADED = True
            importlib.import_module(BUILT_IN_PACKAGE)  # its modules register the built-in methods
            _load_entry_points()
        return _REGISTRY


def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if getattr(cls, "name", None) != ep.name:
                raise ValueError(f"the entry point is named {ep.name!r} but the class says {cls.name!r}")
            register(cls)
        except Exception as exc:  # a broken plugin is reported and skipped; the built-in methods still work
            warnings.warn(f"skipped the explainer plugin {ep.name} = {ep.value}: {exc}", MedvitWarning, stacklevel=2)


def method_names() -> list[str]:
    """Names of every registered method: built-ins in their documented order, then plugins by name."""
    registry = _load()
    return sorted(registry, key=lambda n: (registry[n].rank, n))


def explainer_class(name: str) -> type:
    """The class registered as ``name``; ``MethodError`` (a user error: exit code 2) if there is none."""
    registry = _load()
    if name not in registry:
        from .errors import MethodError

        raise MethodError(f"unknown method {name!r}; expected one of: {', '.join(method_names())}")
    return registry[name]


method_info = explainer_class  # the class carries the metadata: .title, .citation, .class_sensitive, .defaults …


def list_methods() -> list[dict[str, Any]]:
    """The method table as plain dicts: name, title, citation, class_sensitive, kind, space, options,
    joint_with (what ``medvit-explain list-methods --json`` prints)."""
    return [explainer_class(name).describe() for name in method_names()]
