"""cellsam: find and outline every cell in a microscopy image.

Public API (imported lazily so that ``import cellsam`` stays cheap)::

    build_model, load_model, list_models, save_model, Predictor, segment, Segmentation

Importing cellsam sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (before torch loads
OpenMP; see :mod:`cellsam.threads`).
"""

from __future__ import annotations

import importlib
from typing import Any

from cellsam.threads import apply_thread_policy as _apply_thread_policy

__version__ = "0.1.0"

_apply_thread_policy()  # the one import-time effect: OpenMP reads it when torch loads; the user's value wins

_LAZY = {
    "build_model": "cellsam.models.build",
    "load_model": "cellsam.weights",
    "save_model": "cellsam.weights",
    "list_models": "cellsam.weights",
    "Predictor": "cellsam.inference.predictor",
    "segment": "cellsam.inference.segment",
    "Segmentation": "cellsam.inference.segment",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellsam' has no attribute {name!r}")
