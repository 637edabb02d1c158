"""Where and how a model runs: device choice, bf16 autocast, and a model from a name, path or object."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from cellsam.models.protocol import SegmentationModel, check_model

if TYPE_CHECKING:
    from cellsam.models.cellsam import CellSAM

M = TypeVar("M", bound=SegmentationModel)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``fp32``: no autocast; ``bf16``: ``torch.autocast(device.type, dtype=torch.bfloat16)``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: cuda if available, else mps if available, else cpu; else ``torch.device(device)``."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available (use device='cpu' or 'auto')")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but MPS is not available (use device='cpu' or 'auto')")
    return dev


def _model_device(model: object) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def resolve_model(model: M | str | os.PathLike,
                  device: str | torch.device | None = None) -> tuple[M | CellSAM, torch.device]:
    """A ready model and its device: an object of the :class:`~cellsam.models.protocol.SegmentationModel`
    protocol (moved only when ``device`` is given), or a name / checkpoint path loaded with
    :func:`cellsam.weights.load_model`."""
    if isinstance(model, (str, os.PathLike)):
        from cellsam.weights import load_model  # lazy: only needed for names / paths

        dev = resolve_device(device)
        return load_model(model if isinstance(model, str) else Path(model)).to(dev), dev
    check_model(model, SegmentationModel, message="model must be a CellSAM model or a model name / checkpoint path")
    if device is not None:
        dev = resolve_device(device)
        to = getattr(model, "to", None)  # an nn.Module
        return (to(dev) if callable(to) else model), dev
    return model, _model_device(model)
