"""npe2 writer: a Labels layer as a label TIFF, as ``cellsam segment`` writes them (:func:`cellsam.io.write_labels`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cellsam.io import write_labels as _write_labels


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write one 2-D Labels layer to ``path`` (``.tif``/``.tiff``; uint16, or uint32 above 65535 labels)."""
    p = Path(path)
    if p.suffix.lower() not in (".tif", ".tiff"):
        p = p.with_suffix(".tif")
    labels = np.asarray(data)
    if labels.ndim != 2:
        raise ValueError(f"cellsam writes 2-D label images; this layer has shape {labels.shape}")
    if labels.min(initial=0) < 0:
        raise ValueError("label images cannot hold negative labels")
    return [str(_write_labels(p, labels))]
