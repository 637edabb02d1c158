"""Label-image clean-up: the paper's object filters, and Cellpose-style overlap removal.

- :func:`filter_labels`: drop objects with disjoint parts (8-connectivity) or only 1 pixel
  high or wide, renumber the rest 1..N in order of their original id.
- :func:`masks_to_labels`: overlapping binary instance masks (COCO, DSB) -> one label image,
  as Cellpose does for LIVECell: visit masks smallest first, drop a mask when >= 75 % of its
  pixels are also covered by other (not yet dropped) masks, then give every remaining pixel
  to the covering mask with the nearest (pixel-mean) centroid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

FILTERS = ("disjoint", "thin")
_EIGHT = np.ones((3, 3), bool)


def filter_labels(labels: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Apply the object filters and renumber.

    Args:
        labels: (H, W) non-negative integer label image.
    Returns:
        (H, W) int32 labels 1..N (0 background) and counts of objects dropped per filter,
        ``{"disjoint": n, "thin": n}`` (an object failing both counts as "thin").
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"filter_labels: expected (H, W) labels, got shape {labels.shape}")
    out = np.zeros(labels.shape, np.int32)
    drops = dict.fromkeys(FILTERS, 0)
    if labels.size == 0 or labels.max() == 0:
        return out, drops
    k = 0
    for idx, sl in enumerate(ndi.find_objects(labels.astype(np.int64, copy=False)), start=1):
        if sl is None:
            continue
        mask = labels[sl] == idx
        if mask.shape[0] < 2 or mask.shape[1] < 2:
            drops["thin"] += 1
            continue
        _, n_parts = ndi.label(mask, structure=_EIGHT)
        if n_parts > 1:
            drops["disjoint"] += 1
            continue
        k += 1
        out[sl][mask] = k
    return out, drops


def masks_to_labels(masks: Sequence[np.ndarray], *, max_overlap: float = 0.75) -> tuple[np.ndarray, int]:
    """Resolve overlapping binary instance masks into one label image (Cellpose's rule).

    Args:
        masks: N boolean (H, W) masks (same shape), or a (N, H, W) array.
        max_overlap: drop a mask when this fraction or more of its pixels overlap others.
    Returns:
        (H, W) int32 labels 1..M (masks kept, in input order) and the number of masks dropped
        (for overlap or emptiness).
    """
    if len(masks) == 0:
        raise ValueError("masks_to_labels: at least one mask is needed to know the image size")
    shape = np.shape(masks[0])
    pix = []
    for m in masks:
        m = np.asarray(m)
        if m.shape != shape:
            raise ValueError(f"masks_to_labels: mask shapes differ: {m.shape} vs {shape}")
        pix.append(np.flatnonzero(m))
    size = int(np.prod(shape))
    count = np.zeros(size, np.int32)
    for p in pix:
        count[p] += 1
    keep = [len(p) > 0 for p in pix]
    order = sorted(range(len(pix)), key=lambda i: (len(pix[i]), i))
    for i in order:
        if not keep[i]:
            continue
        if np.mean(count[pix[i]] > 1) >= max_overlap:
            keep[i] = False
            count[pix[i]] -= 1
    labels = np.zeros(size, np.int32)
    best = np.full(size, np.inf)
    width = shape[1]
    k = 0
    for i, p in enumerate(pix):
        if not keep[i]:
            continue
        k += 1
        yy, xx = np.divmod(p, width)
        d = (yy - yy.mean()) ** 2 + (xx - xx.mean()) ** 2
        win = d < best[p]
        labels[p[win]] = k
        best[p[win]] = d[win]
    return labels.reshape(shape), len(pix) - k
