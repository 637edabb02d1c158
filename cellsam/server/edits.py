"""Label-image edits as pure numpy functions (no I/O, no model).

Every function takes an (H, W) int32 label image (0 = background, 1..n cells, ids need not be
consecutive) and returns a NEW array; the caller diffs old and new with :func:`changed_window`
to store a compact undo record. Coordinates are pixels of the image, x = column, y = row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellsam.ops.masks import fill_holes, keep_largest_component

Window = tuple[int, int, int, int]  # (y0, x0, y1, x1), exclusive end


def next_label(labels: np.ndarray) -> int:
    """The id a new cell gets: max + 1."""
    return int(labels.max(initial=0)) + 1


def n_cells(labels: np.ndarray) -> int:
    """Number of distinct nonzero labels (linear time for ids below 2**24)."""
    top = int(labels.max(initial=0))
    if top <= 0:
        return 0
    if top < 1 << 24:
        return int(np.count_nonzero(np.bincount(labels.ravel(), minlength=top + 1)[1:]))
    ids = np.unique(labels)
    return int((ids > 0).sum())


def changed_window(before: np.ndarray, after: np.ndarray) -> Window | None:
    """Tight (y0, x0, y1, x1) box of the pixels that differ, or None if nothing changed."""
    if before.shape != after.shape:
        raise ValueError(f"label images differ in shape: {before.shape} vs {after.shape}")
    diff = before != after
    rows = np.flatnonzero(diff.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(diff.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def clean_mask(mask: np.ndarray) -> np.ndarray:
    """(h, w) bool -> largest 8-connected island with holes filled."""
    if not mask.any():
        return mask.astype(bool)
    return fill_holes(keep_largest_component(mask))


def place_mask(
    labels: np.ndarray,
    mask: np.ndarray,
    *,
    y0: int = 0,
    x0: int = 0,
    label: int | None = None,
    overwrite: bool = False,
) -> tuple[np.ndarray, int]:
    """Put one cell into the label image.

    Args:
        labels: (H, W) int32.
        mask: (h, w) bool, the cell's pixels on the window starting at (y0, x0); parts outside the
            image are cut off.
        label: id to (re)draw; None = a new cell (:func:`next_label`). An existing cell is replaced:
            its old pixels become background first (refinement).
        overwrite: the cell may take pixels of other cells (else only background and its own).
    Returns:
        (new labels, the cell's id).
    Raises:
        ValueError: empty mask, or a mask lying wholly outside the image.
    """
    out = labels.copy()
    lab = next_label(labels) if label is None else int(label)
    if lab < 1:
        raise ValueError(f"cell id must be >= 1, got {lab}")
    h, w = labels.shape
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + mask.shape[0], h), min(x0 + mask.shape[1], w)
    if ya >= yb or xa >= xb:
        raise ValueError("the mask lies outside the image")
    m = mask[ya - y0 : yb - y0, xa - x0 : xb - x0].astype(bool)
    if not m.any():
        raise ValueError("the mask is empty: nothing to add (try another prompt)")
    if label is not None:
        out[out == lab] = 0
    win = out[ya:yb, xa:xb]
    take = m if overwrite else m & ((win == 0) | (win == lab))
    if not take.any():
        raise ValueError("the new cell would only cover other cells; enable overwrite to take their pixels")
    win[take] = lab
    return out, lab


def delete_cells(labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Set the pixels of the cells ``ids`` to background; unknown ids raise ``ValueError``."""
    ids = [int(i) for i in ids]
    _require_present(labels, ids)
    out = labels.copy()
    out[np.isin(out, ids)] = 0
    return out


def merge_cells(labels: np.ndarray, ids: Sequence[int]) -> tuple[np.ndarray, int]:
    """Relabel the cells ``ids`` (at least two) as one cell with the smallest of their ids."""
    ids = sorted({int(i) for i in ids})
    if len(ids) < 2:
        raise ValueError(f"merge needs at least two different cells, got {ids}")
    _require_present(labels, ids)
    out = labels.copy()
    out[np.isin(out, ids[1:])] = ids[0]
    return out, ids[0]


def _require_present(labels: np.ndarray, ids: Sequence[int]) -> None:
    if not ids:
        raise ValueError("no cell ids given")
    present = set(np.unique(labels).tolist())
    missing = [i for i in ids if i < 1 or i not in present]
    if missing:
        raise ValueError(f"no such cell(s): {missing}")


def stroke_mask(
    shape: tuple[int, int], points: Sequence[tuple[float, float]], radius: float
) -> tuple[np.ndarray, int, int]:
    """Pixels covered by a round brush of ``radius`` dragged along ``points`` ((x, y) pairs).

    Returns:
        (mask (h, w) bool on a window, y0, x0) clipped to the image; an empty window when the
        stroke misses the image.
    """
    if not points:
        raise ValueError("a brush stroke needs at least one point")
    r = float(radius)
    if not 0.5 <= r <= 512:
        raise ValueError(f"brush radius must be in [0.5, 512] pixels, got {radius}")
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if not np.isfinite(pts).all():
        raise ValueError("brush points must be finite numbers")
    # densify: consecutive samples at most r/2 apart so the discs overlap into a stroke
    dense = [pts[0]]
    for a, b in zip(pts[:-1], pts[1:], strict=True):
        n = max(1, int(np.ceil(np.hypot(*(b - a)) / max(r / 2, 0.5))))
        dense += [a + (b - a) * t for t in np.linspace(0, 1, n + 1)[1:]]
    d = np.asarray(dense)
    h, w = shape
    y0, x0 = max(int(np.floor(d[:, 1].min() - r)), 0), max(int(np.floor(d[:, 0].min() - r)), 0)
    y1, x1 = min(int(np.ceil(d[:, 1].max() + r)) + 1, h), min(int(np.ceil(d[:, 0].max() + r)) + 1, w)
    if y0 >= y1 or x0 >= x1:
        return np.zeros((0, 0), bool), 0, 0
    yy, xx = np.mgrid[y0:y1, x0:x1]
    out = np.zeros((y1 - y0, x1 - x0), bool)
    for x, y in d:  # pixel centres within r of a sample (pixel (i, j) covers [j, j+1) x [i, i+1))
        out |= (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= r * r
    return out, y0, x0


def paint(
    labels: np.ndarray,
    points: Sequence[tuple[float, float]],
    radius: float,
    *,
    label: int | None,
    erase: bool = False,
    overwrite: bool = False,
) -> tuple[np.ndarray, int]:
    """Brush: paint cell ``label`` (None = a new cell) or erase along a stroke.

    Painting takes background pixels (and other cells' pixels with ``overwrite``). Erasing clears
    the pixels of ``label`` only, or of every cell when ``label`` is None.
    Returns (new labels, the painted / erased label, 0 for erase-all).
    """
    mask, y0, x0 = stroke_mask(labels.shape, points, radius)
    out = labels.copy()
    if mask.size == 0:
        return out, int(label or 0)
    win = out[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
    if erase:
        sel = mask & (win > 0) if label is None else mask & (win == int(label))
        win[sel] = 0
        return out, int(label or 0)
    lab = next_label(labels) if label is None else int(label)
    if lab < 1:
        raise ValueError(f"cell id must be >= 1, got {lab}")
    sel = mask if overwrite else mask & ((win == 0) | (win == lab))
    win[sel] = lab
    return out, lab


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber the cells 1..n in order of their current ids (for exports)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return lut[labels]
