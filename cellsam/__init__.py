"""cellsam: find and outline every cell in a microscopy image.

Public API (imported lazily so that ``import cellsam`` stays cheap)::

    build_model, load_model, list_models, save_model, Predictor, segment, Segmentation, SegmentParams

Importing cellsam sets ``OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000`` unless the environment sets
``OMP_WAIT_POLICY`` (before torch loads OpenMP; see :mod:`cellsam.threads`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cellsam.threads import apply_thread_policy as _apply_thread_policy

if TYPE_CHECKING:  # what editors and type checkers see; at run time the names below load on first use
    from cellsam.inference.params import SegmentParams as SegmentParams
    from cellsam.inference.predictor import Predictor as Predictor
    from cellsam.inference.segment import Segmentation as Segmentation
    from cellsam.inference.segment import segment as segment
    from cellsam.models.build import build_model as build_model
    from cellsam.weights import list_models as list_models
    from cellsam.weights import load_model as load_model
    from cellsam.weights import save_model as save_model

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
    "SegmentParams": "cellsam.inference.params",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __dir__() -> list[str]:
    return list(__all__)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellsam' has no attribute {name!r}")
