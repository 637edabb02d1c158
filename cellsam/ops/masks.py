"""Per-cell mask postprocessing and assembly of one label image by arg-max over mask logits.

A cell is described by a *crop*: its mask logits on a window ``(y0, x0, h, w)`` of the full
image, so that memory grows with the cells' areas, not with N x H x W.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class CellMask:
    """One cell's mask on a window of the image.

    Attributes:
        y0, x0: top-left corner of the window in image pixels.
        mask: (h, w) bool, the cell's pixels inside the window.
    """

    y0: int
    x0: int
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def to_full(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask pasted into an all-False (H, W) array."""
        out = np.zeros(shape, bool)
        h, w = self.mask.shape
        out[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.mask
        return out


def logit_threshold(prob_threshold: float) -> float:
    """The logit t with sigmoid(t) = ``prob_threshold`` (``prob_threshold`` in (0, 1))."""
    if not 0.0 < prob_threshold < 1.0:
        raise ValueError(f"mask_threshold must be in (0, 1), got {prob_threshold}")
    return float(np.log(prob_threshold / (1.0 - prob_threshold)))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool with enclosed background holes filled."""
    return ndimage.binary_fill_holes(mask)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool with only the largest 8-connected component (empty stays empty)."""
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask.astype(bool, copy=False)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(sizes.argmax())


def clean_cell_mask(logits: np.ndarray, *, mask_threshold: float = 0.5) -> np.ndarray:
    """Binarise one cell's logits at probability ``mask_threshold``, fill holes, keep the largest island.

    Args:
        logits: (h, w) float mask logits (before sigmoid).
    Returns:
        (h, w) bool.
    """
    m = logits > logit_threshold(mask_threshold)
    if not m.any():
        return m
    return fill_holes(keep_largest_component(m))


def merge_by_argmax(
    cells: Sequence[tuple[int, int, np.ndarray, np.ndarray]], shape: tuple[int, int]
) -> np.ndarray:
    """Assemble one label image: each pixel goes to the cell with the highest logit among the cells
    whose (cleaned) mask contains it.

    Args:
        cells: per cell ``(y0, x0, mask (h,w) bool, logits (h,w) float)`` on a window of the image;
            windows must lie inside ``shape``.
        shape: (H, W) of the label image.
    Returns:
        (H, W) int32 labels; cell ``i`` of ``cells`` gets label ``i + 1`` (0 = background). A cell
        that wins no pixel is absent.
    """
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, -np.inf, np.float32)
    for i, (y0, x0, mask, logits) in enumerate(cells):
        h, w = mask.shape
        win_best = best[y0 : y0 + h, x0 : x0 + w]
        win_lab = labels[y0 : y0 + h, x0 : x0 + w]
        take = mask & (logits > win_best)
        win_best[take] = logits[take]
        win_lab[take] = i + 1
    return labels


def area_floor(areas: np.ndarray, *, min_area: int = 0, min_area_rel: float = 0.0) -> float:
    """The smallest area a cell may have among cells of ``areas`` (N,) pixels: ``min_area``, raised to
    ``min_area_rel`` x the median of the areas that reach ``min_area`` (specks and fragments far smaller
    than the image's typical cell; 0: off)."""
    areas = np.asarray(areas)
    floor = float(max(int(min_area), 1))
    big = areas[areas >= floor]
    if min_area_rel > 0 and big.size:
        floor = max(floor, float(min_area_rel) * float(np.median(big)))
    return floor


def clean_labels(labels: np.ndarray, *, min_area: int = 0, min_area_rel: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Keep the largest component of every label, drop labels under :func:`area_floor` px, renumber 1..N.

    Args:
        labels: (H, W) int label image, 0 = background.
        min_area: labels with fewer pixels (after keeping their largest component) are dropped.
        min_area_rel: also drop labels under this fraction of the median area of the labels that reach
            ``min_area`` (0: off).
    Returns:
        new labels (H, W) int32 numbered 1..N in the order of the old labels, and ``old_ids`` (N,)
        int64 with the old label of each new one (new label ``k`` was ``old_ids[k-1]``).
    """
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.int32)
    parts = [(lab, sl, keep_largest_component(labels[sl] == lab))
             for lab, sl in enumerate(ndimage.find_objects(labels), start=1) if sl is not None]
    areas = np.array([int(m.sum()) for _, _, m in parts], np.int64)
    floor = area_floor(areas, min_area=min_area, min_area_rel=min_area_rel)
    old_ids: list[int] = []
    for (lab, sl, m), area in zip(parts, areas, strict=True):
        if area < floor:
            continue
        old_ids.append(lab)
        out[sl][m] = len(old_ids)
    return out, np.asarray(old_ids, np.int64)


def outlines(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels of a cell with a 4-neighbour outside that cell (inner boundaries)."""
    lab = np.asarray(labels)
    pad = np.pad(lab, 1, mode="edge")
    centre = pad[1:-1, 1:-1]
    edge = np.zeros(lab.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= pad[dy : dy + lab.shape[0], dx : dx + lab.shape[1]] != centre
    return edge & (lab > 0)


def label_boxes(labels: np.ndarray, n: int) -> np.ndarray:
    """(n, 4) float32 xyxy boxes (x1, y1 exclusive) of labels 1..n of a label image; zeros for absent ones."""
    boxes = np.zeros((n, 4), np.float32)
    for lab, sl in enumerate(ndimage.find_objects(np.asarray(labels), max_label=n), start=1):
        if sl is not None:
            boxes[lab - 1] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return boxes
