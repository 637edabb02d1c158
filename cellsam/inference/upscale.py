"""Mask logits from the decoder's low resolution to tile pixels, one cell's window at a time.

SAM's post-processing resizes every low-resolution mask (4h x 4w) bilinearly to the S x S model
input, and here once more to the tile's T x T pixels. Done on full frames that is N x T x T floats for
N cells (at ViT-B's 1024 input, 4 MB a cell) although a cell covers a few hundred pixels.

Bilinear resizing (``align_corners=False``, no antialiasing) is separable and linear: the resized
map is ``My @ X @ Mx.T`` with ``My``, ``Mx`` the (T, r) interpolation matrices (the two resizes
composed). Every output pixel is a convex combination of input pixels, so it can exceed the mask
threshold only where an input pixel it draws from does. :func:`upscale_cells` therefore computes,
for each cell, only the output rows / columns that draw from the cell's above-threshold low-res
rows / columns, from the low-res window they need: the same values as full-frame resizing (up to
float rounding), at the cost of the cell's window.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


@lru_cache(maxsize=16)
def resize_matrix(n_in: int, sizes: tuple[int, ...]) -> np.ndarray:
    """(sizes[-1], n_in) float32 matrix of bilinear resizing n_in -> sizes[0] -> ... -> sizes[-1].

    Row i holds the weights of output pixel i, exactly those of ``F.interpolate(mode="bilinear",
    align_corners=False)`` along one axis (computed by resizing the identity).
    """
    m = torch.eye(n_in, dtype=torch.float64)[None]  # (1, n_in channels, n_in): channel c = unit impulse c
    for n_out in sizes:
        m = F.interpolate(m, size=n_out, mode="linear", align_corners=False)
    return np.ascontiguousarray(m[0].T.numpy().astype(np.float32))  # (n_out, n_in)


def _span(weights: np.ndarray, lo: int, hi: int, limit: int) -> tuple[int, int, int, int]:
    """Output range [o0, o1) (o1 <= limit) of the rows of ``weights`` that draw on inputs [lo, hi), and
    the input range [i0, i1) those rows draw on. o0 == o1 when none does."""
    rows = np.flatnonzero(weights[:limit, lo:hi].any(axis=1))
    if rows.size == 0:
        return 0, 0, 0, 0
    o0, o1 = int(rows[0]), int(rows[-1]) + 1
    cols = np.flatnonzero(weights[o0:o1].any(axis=0))
    return o0, o1, int(cols[0]), int(cols[-1]) + 1


def upscale_cells(
    low_res: torch.Tensor, sizes: tuple[int, ...], thr: float, valid: tuple[int, int]
) -> list[tuple[int, int, np.ndarray] | None]:
    """Each cell's logits resized to tile pixels, on the window where they can exceed ``thr``.

    Args:
        low_res: (N, r, r) low-resolution mask logits (any float dtype).
        sizes: the successive square sizes of the resizing, e.g. ``(S,)`` or ``(S, T)``.
        thr: logit threshold of the mask.
        valid: (vh, vw) rows / columns of the final size that hold image (a padded tile has fewer).
    Returns:
        per cell ``(y0, x0, logits)``, the float32 window ``[y0:y0+h, x0:x0+w]`` of the resized map
        (inside ``valid``), or None when no pixel can exceed ``thr``.
    """
    lo = low_res.float().cpu().numpy()
    m = resize_matrix(int(lo.shape[-1]), tuple(int(s) for s in sizes))
    out: list[tuple[int, int, np.ndarray] | None] = []
    for x in lo:
        fg = x > thr
        rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
        if rows.size == 0:
            out.append(None)
            continue
        y0, y1, r0, r1 = _span(m, int(rows[0]), int(rows[-1]) + 1, valid[0])
        x0, x1, c0, c1 = _span(m, int(cols[0]), int(cols[-1]) + 1, valid[1])
        if y0 == y1 or x0 == x1:
            out.append(None)
            continue
        win = m[y0:y1, r0:r1] @ x[r0:r1, c0:c1] @ m[x0:x1, c0:c1].T
        out.append((y0, x0, np.ascontiguousarray(win, dtype=np.float32)))
    return out
