"""Scaling out with ``dask.distributed``: large images by blocks, many files by workers.

- :func:`segment_dask` (:mod:`.pipeline`): one large image (OME-Zarr / Zarr / TIFF / NPY read lazily)
  cut into overlapping blocks of tiles, segmented on workers, stitched with the single-process rules,
  written to OME-Zarr with a multiscale pyramid.
- :func:`segment_files` (:mod:`.files`): many files over workers, same outputs as ``cellsam segment``.

Imported lazily: ``import cellsam.distributed`` does not import dask.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "segment_dask": "cellsam.distributed.pipeline",
    "get_client": "cellsam.distributed.cluster",
    "BlockFailure": "cellsam.distributed.cluster",
    "LargeResult": "cellsam.distributed.pipeline",
    "segment_files": "cellsam.distributed.files",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cellsam.distributed' has no attribute {name!r}")
