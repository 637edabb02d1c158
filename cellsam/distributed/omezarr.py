"""Label images as OME-Zarr (NGFF 0.4): level 0 written region by region, then nearest-neighbour levels.

Layout of ``OUT.ome.zarr`` (zarr v2, ``/`` dimension separator, Blosc-compressed uint32)::

    .zattrs   {"multiscales": [{"version": "0.4", "name": ..., "axes": [y, x],
               "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]},
                            {"path": "1", ... "scale": [2, 2]}, ...],
               "type": "nearest", "metadata": {...}}]}
    0/        (H, W) labels, chunks (chunk, chunk)
    1/        labels[::2, ::2] ... level k = labels[::2**k, ::2**k] (nearest: labels are never blended)

Regions written by different tasks are unions of whole chunks, so no two writers touch one chunk.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.distributed.source import Rect

NGFF_VERSION = "0.4"


def default_levels(shape: tuple[int, int], chunk: int, max_levels: int = 8) -> int:
    """Levels until the largest side fits in one chunk (at least 1, at most ``max_levels``)."""
    side = max(shape)
    return int(min(max_levels, 1 + max(0, math.ceil(math.log2(side / chunk))))) if side > chunk else 1


def multiscales(name: str, n_levels: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The NGFF 0.4 ``multiscales`` attribute of a (y, x) label pyramid with factor-2 levels."""
    return {
        "multiscales": [
            {
                "version": NGFF_VERSION,
                "name": name,
                "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                "datasets": [
                    {
                        "path": str(k),
                        "coordinateTransformations": [{"type": "scale", "scale": [2.0**k, 2.0**k]}],
                    }
                    for k in range(n_levels)
                ],
                "type": "nearest",
                "metadata": {"method": "labels[::2**k, ::2**k] (nearest neighbour)", **(extra or {})},
            }
        ]
    }


def create(
    path: str | Path,
    shape: tuple[int, int],
    *,
    chunk: int = 1024,
    levels: int | None = None,
    name: str = "labels",
    extra: dict[str, Any] | None = None,
) -> list[Any]:
    """Create the empty pyramid (overwriting ``path``); returns the zarr arrays of all levels."""
    import zarr

    if not isinstance(chunk, (int, np.integer)) or chunk < 16:
        raise ValueError(f"chunk must be an integer >= 16, got {chunk!r}")
    n = default_levels(shape, chunk) if levels is None else int(levels)
    if n < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    root = zarr.open_group(str(path), mode="w")
    arrays = []
    for k in range(n):
        h, w = -(-shape[0] // 2**k), -(-shape[1] // 2**k)
        arrays.append(
            root.create_dataset(
                str(k),
                shape=(h, w),
                chunks=(min(chunk, h), min(chunk, w)),
                dtype=np.uint32,
                fill_value=0,
                dimension_separator="/",
                write_empty_chunks=False,
            )
        )
    root.attrs.update(multiscales(name, n, extra))
    return arrays


def regions(shape: tuple[int, int], size: int) -> list[Rect]:
    """Row-major (y0, x0, y1, x1) regions of ``size`` (a multiple of the chunk side) covering ``shape``."""
    return [
        (y, x, min(y + size, shape[0]), min(x + size, shape[1]))
        for y in range(0, shape[0], size)
        for x in range(0, shape[1], size)
    ]


def write_region(path: str | Path, region: Rect, labels: np.ndarray) -> int:
    """Write ``labels`` (h, w) at ``region`` of level 0; returns the number of pixels written."""
    import zarr

    arr = zarr.open_array(str(Path(path) / "0"), mode="r+")
    y0, x0, y1, x1 = region
    arr[y0:y1, x0:x1] = labels
    return int(labels.size)


def downsample_level(path: str | Path, level: int, region: Rect) -> None:
    """Fill ``region`` (level-``level`` pixels) of level ``level`` from level ``level - 1`` by [::2, ::2]."""
    import zarr

    src = zarr.open_array(str(Path(path) / str(level - 1)), mode="r")
    dst = zarr.open_array(str(Path(path) / str(level)), mode="r+")
    y0, x0, y1, x1 = region
    dst[y0:y1, x0:x1] = src[2 * y0 : 2 * y1 : 2, 2 * x0 : 2 * x1 : 2]
