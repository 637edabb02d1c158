"""Fixed-size training tiles (paper Appendix A): 512 x 512 with 25 % overlap, zero-filled.

Along each axis, tiles start at 0, stride, 2*stride, ... (stride = tile - overlap = 384) until
one reaches the end of the image; the part of a tile beyond the image is zero-filled (image)
and background (labels). An image smaller than a tile gives one zero-padded tile.
"""

from __future__ import annotations

import math

import numpy as np

TILE = 512
OVERLAP = 0.25


def tile_starts(size: int, *, tile: int = TILE, overlap: float = OVERLAP) -> list[int]:
    """Start offsets along one axis of length ``size`` so that tiles cover it all.

    Returns ``[0, s, 2s, ...]`` with ``s = tile - round(tile * overlap)``, the last tile being the
    first whose end reaches ``size``.
    """
    if size < 1 or tile < 1:
        raise ValueError(f"tile_starts: size and tile must be positive, got size={size}, tile={tile}")
    if not 0 <= overlap < 1:
        raise ValueError(f"tile_starts: overlap must be in [0, 1), got {overlap}")
    stride = tile - round(tile * overlap)
    n = 1 + math.ceil(max(size - tile, 0) / stride)
    return [i * stride for i in range(n)]


def crop_origins(shape: tuple[int, int], *, tile: int = TILE, overlap: float = OVERLAP) -> list[tuple[int, int]]:
    """Row-major list of (y0, x0) origins of the training crops (:func:`crop`) covering an (H, W) image.

    Not the inference grid (:func:`cellsam.inference.tiling.tile_grid`, whose last tile is shifted to end at
    the image edge): these crops run past the edge and are zero-filled."""
    h, w = shape
    return [
        (y, x)
        for y in tile_starts(h, tile=tile, overlap=overlap)
        for x in tile_starts(w, tile=tile, overlap=overlap)
    ]


def crop(arr: np.ndarray, y0: int, x0: int, *, tile: int = TILE) -> np.ndarray:
    """(..., H, W) -> (..., tile, tile) window at (y0, x0), zero-filled beyond the image."""
    out = np.zeros(arr.shape[:-2] + (tile, tile), arr.dtype)
    part = arr[..., y0 : y0 + tile, x0 : x0 + tile]
    out[..., : part.shape[-2], : part.shape[-1]] = part
    return out
