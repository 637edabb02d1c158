"""Object overlap and one-to-one matching between two label images.

A label image is an integer array, 0 = background, any other value = one object. Labels need not be
consecutive; objects are identified by their label value and indexed in sorted label order.

The overlap of all object pairs is built from one pass over the pixels (``np.bincount`` on pair codes),
so it stays fast for thousands of objects; only pairs that share at least one pixel are stored.

Threshold convention: a match requires ``IoU >= threshold`` (the Cellpose / reference-code convention,
``strict=False``). ``strict=True`` gives ``IoU > threshold`` (DeepCell's convention, used at 0.6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "Overlap", "Matching", "label_overlap", "iou_matrix", "match_objects", "assign_components",
    "check_label_pair", "check_label_image",
]

# Largest label value for which a dense lookup table is used to compress labels (else np.unique).
_MAX_LUT_LABEL = 1 << 24


def check_label_image(x: object, name: str) -> np.ndarray:
    """Validate one label image (integer or bool numpy array, no negative labels); bool -> int64.

    Raises:
        TypeError: not a numpy array, or not integer/bool. ValueError: negative labels.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (a label image), got {type(x).__name__}")
    if x.dtype == bool:
        return x.astype(np.int64)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype (label image, 0 = background), got {x.dtype}")
    if x.size and x.min() < 0:
        raise ValueError(f"{name} has negative labels (min {x.min()}); labels must be >= 0")
    return x


def check_label_pair(gt: object, pred: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (ground truth, prediction) pair of label images of identical shape.

    Raises:
        TypeError: not numpy integer (or bool) arrays.
        ValueError: shapes differ, or negative labels.
    """
    g = check_label_image(gt, "gt")
    p = check_label_image(pred, "pred")
    if g.shape != p.shape:
        raise ValueError(f"gt and pred must have the same shape, got {g.shape} and {p.shape}")
    return g, p


def _compress(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map labels to 0 (background) and 1..n (sorted objects).

    Returns:
        index: (P,) int64, compressed label of each pixel; ids: (n,) int64, original label values.
    """
    flat = x.ravel()
    top = int(flat.max()) if flat.size else 0
    if top < _MAX_LUT_LABEL:
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present).astype(np.int64)
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat], ids
    uniq, inv = np.unique(flat, return_inverse=True)
    if uniq[0] == 0:
        return inv.astype(np.int64), uniq[1:].astype(np.int64)
    return inv.astype(np.int64) + 1, uniq.astype(np.int64)


@dataclass(frozen=True)
class Overlap:
    """Sparse pixel overlap of every (gt object, pred object) pair that shares at least one pixel.

    Attributes:
        gt_ids: (n_t,) int64 label values of the ground-truth objects, sorted.
        pred_ids: (n_p,) int64 label values of the predicted objects, sorted.
        gt_areas: (n_t,) int64 pixel counts. pred_areas: (n_p,) int64 pixel counts.
        rows: (E,) int64 index into gt_ids. cols: (E,) int64 index into pred_ids.
        intersection: (E,) int64 shared pixels of each stored pair (> 0).
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_areas: np.ndarray
    pred_areas: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    intersection: np.ndarray

    @property
    def n_gt(self) -> int:
        return int(self.gt_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @property
    def iou(self) -> np.ndarray:
        """(E,) float64 IoU of each stored pair: intersection / (area_t + area_p - intersection)."""
        union = self.gt_areas[self.rows] + self.pred_areas[self.cols] - self.intersection
        return self.intersection / union

    def dense_iou(self) -> np.ndarray:
        """(n_t, n_p) float64 IoU matrix (zeros where objects do not touch)."""
        out = np.zeros((self.n_gt, self.n_pred), np.float64)
        out[self.rows, self.cols] = self.iou
        return out

    def dense_intersection(self) -> np.ndarray:
        """(n_t, n_p) int64 pixel-overlap matrix."""
        out = np.zeros((self.n_gt, self.n_pred), np.int64)
        out[self.rows, self.cols] = self.intersection
        return out


def label_overlap(gt: np.ndarray, pred: np.ndarray) -> Overlap:
    """Pixel overlap between every ground-truth and predicted object.

    Args:
        gt: (H, W) (or any shape) integer label image, 0 = background.
        pred: integer label image of the same shape.

    Returns:
        Overlap with the object ids, areas and the sparse intersections.
    """
    g, p = check_label_pair(gt, pred)
    gi, gt_ids = _compress(g)
    pj, pred_ids = _compress(p)
    n_t, n_p = gt_ids.size, pred_ids.size
    gt_areas = np.bincount(gi, minlength=n_t + 1)[1:].astype(np.int64)
    pred_areas = np.bincount(pj, minlength=n_p + 1)[1:].astype(np.int64)
    both = (gi > 0) & (pj > 0)
    codes = (gi[both] - 1) * n_p + (pj[both] - 1)
    if n_t * n_p <= max(4 * codes.size, 1 << 22):
        counts = np.bincount(codes, minlength=n_t * n_p)
        pairs = np.flatnonzero(counts)
        inter = counts[pairs].astype(np.int64)
    else:
        pairs, inter = np.unique(codes, return_counts=True)
        inter = inter.astype(np.int64)
    pairs = pairs.astype(np.int64)
    return Overlap(gt_ids, pred_ids, gt_areas, pred_areas, pairs // max(n_p, 1), pairs % max(n_p, 1), inter)


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense IoU matrix between two label images.

    Returns:
        iou: (n_t, n_p) float64; gt_ids: (n_t,) label values of the rows; pred_ids: (n_p,) of the columns.
    """
    ov = label_overlap(gt, pred)
    return ov.dense_iou(), ov.gt_ids, ov.pred_ids


def assign_components(n_rows: int, n_cols: int, rows: np.ndarray, cols: np.ndarray,
                      cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one assignment restricted to the given candidate edges.

    Pairs that are not candidates cost 0 and are never reported, so a candidate is only used when its
    cost is negative. The bipartite graph of candidates is split into connected components and each
    component is solved exactly with ``linear_sum_assignment`` (single-edge components trivially), which
    is exact because components share no rows or columns.

    Args:
        n_rows, n_cols: sizes of the two object sets.
        rows, cols: (E,) int candidate edges (no duplicates). cost: (E,) float, should be < 0.

    Returns:
        (K,) edge indices into ``rows``/``cols`` of the chosen pairs, and their (K,) costs.
    """
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    cost = np.asarray(cost, np.float64)
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    n = n_rows + n_cols
    graph = coo_matrix((np.ones(rows.size), (rows, n_rows + cols)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[rows]
    order = np.argsort(edge_comp, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
    chosen: list[np.ndarray] = []
    for group in np.split(order, bounds):
        if group.size == 1:
            if cost[group[0]] < 0:
                chosen.append(group)
            continue
        r_u, r_inv = np.unique(rows[group], return_inverse=True)
        c_u, c_inv = np.unique(cols[group], return_inverse=True)
        block = np.zeros((r_u.size, c_u.size))
        edge_of = np.full((r_u.size, c_u.size), -1, np.int64)
        block[r_inv, c_inv] = cost[group]
        edge_of[r_inv, c_inv] = group
        ri, ci = linear_sum_assignment(block)
        picked = edge_of[ri, ci]
        keep = (picked >= 0) & (block[ri, ci] < 0)
        chosen.append(picked[keep])
    idx = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return idx, cost[idx]


@dataclass(frozen=True)
class Matching:
    """One-to-one matches at a threshold.

    Attributes:
        gt_index: (K,) int64 index into ``Overlap.gt_ids``; pred_index: (K,) int64 into ``pred_ids``.
        iou: (K,) float64 IoU of each matched pair. n_gt, n_pred: object counts.
    """

    gt_index: np.ndarray
    pred_index: np.ndarray
    iou: np.ndarray
    n_gt: int
    n_pred: int

    @property
    def tp(self) -> int:
        return int(self.gt_index.size)

    @property
    def f1(self) -> float:
        """F1 of this image's objects, ``2 tp / (n_gt + n_pred)``; 0 when both are empty (the reference
        code's per-image F1, averaged by ``f1_mean`` in :func:`cellsam.eval.metrics.evaluate_labels`)."""
        return 2 * self.tp / max(self.n_gt + self.n_pred, 1)


def match_objects(overlap: Overlap, *, threshold: float = 0.5, strict: bool = False) -> Matching:
    """Optimal one-to-one matching of objects whose IoU passes a threshold.

    Maximises the number of matched pairs and, among maximal matchings, the sum of their IoUs (the cost
    used by Cellpose: ``-(IoU >= t) - IoU / (2 n_min)``). Above a threshold of 0.5 every object has at
    most one candidate, so the matching is unique.

    Args:
        overlap: from :func:`label_overlap`.
        threshold: IoU threshold in (0, 1].
        strict: False: a match needs ``IoU >= threshold``; True: ``IoU > threshold``.
    """
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    iou = overlap.iou
    ok = iou > threshold if strict else iou >= threshold
    edges = np.flatnonzero(ok)
    n_min = max(min(overlap.n_gt, overlap.n_pred), 1)
    cost = -1.0 - iou[edges] / (2.0 * n_min)
    picked, _ = assign_components(overlap.n_gt, overlap.n_pred, overlap.rows[edges], overlap.cols[edges],
                                  cost)
    e = edges[picked]
    return Matching(overlap.rows[e], overlap.cols[e], iou[e], overlap.n_gt, overlap.n_pred)
