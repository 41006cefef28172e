"""medvit-explain: explain Vision Transformer predictions on CT scans.

The public API is imported lazily so ``import medvit_explain`` (and the CLI's ``--help``) stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "Volume": "medvit_explain.volume",
    "load_volume": "medvit_explain.io",
    "write_volume": "medvit_explain.io",
    "MedvitInputError": "medvit_explain.errors",
    "load_model": "medvit_explain.model",
    "save_checkpoint": "medvit_explain.model",
    "wrap_model": "medvit_explain.model",
    "explain": "medvit_explain.explainers",
    "upsample": "medvit_explain.explainers",
    "normalize_for_display": "medvit_explain.explainers",
    "list_methods": "medvit_explain.registry",
    "predict": "medvit_explain.prediction",
    "explain_volume": "medvit_explain.pipeline",
    "write_outputs": "medvit_explain.outputs",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'medvit_explain' has no attribute {name!r}")
