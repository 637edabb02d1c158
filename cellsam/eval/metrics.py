"""Instance-segmentation metrics on label images: counts, precision/recall/F1, AP, mSA, AJI.

Conventions (used everywhere in :mod:`cellsam.eval`):

- A match needs ``IoU >= t`` (one-to-one, optimal assignment, see :mod:`cellsam.eval.matching`).
- Per image: TP = matches, FP = n_pred - TP, FN = n_true - TP; precision = TP / n_pred, recall =
  TP / n_true, F1 = 2 TP / (n_true + n_pred) = TP / (TP + (FP + FN) / 2), AP (Cellpose's "average
  precision", micro-sam's "segmentation accuracy") = TP / (TP + FP + FN).
- An undefined ratio (0/0) is **1.0 when the image has neither true nor predicted objects** (a perfect
  answer) and **0.0 otherwise** (e.g. precision with no predictions but some ground truth).
- *Pooled* values sum TP/FP/FN over images first; *image-mean* values average the per-image values.
- ``f1_mean`` reproduces the CellSAM reference evaluation (``paper_evaluation/eval_main.py``): per-image
  ``F1 = TP / (TP + (FP + FN) / 2)`` at ``IoU >= 0.5`` with NaN (both empty) set to **0**, averaged.
- mSA = mean over t in 0.50, 0.55, ..., 0.95 of the image-mean AP (micro-sam).
- Objects are counted as distinct nonzero labels (Cellpose counts ``max(label)``; same for
  consecutive labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellsam.eval.coco import coco_metrics
from cellsam.eval.deepcell import deepcell_object_metrics, deepcell_summary
from cellsam.eval.matching import Overlap, assign_components, label_overlap, match_objects

__all__ = [
    "MSA_THRESHOLDS", "threshold_key", "ratio", "image_counts", "average_precision",
    "aggregated_jaccard_index", "evaluate_labels",
]

MSA_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in np.round(np.arange(0.5, 0.951, 0.05), 2))


def threshold_key(t: float) -> str:
    """Dictionary key of an IoU threshold, e.g. 0.5 -> "0.50"."""
    return f"{float(t):.2f}"


def ratio(num: float, den: float, *, both_empty: bool) -> float:
    """num / den, with 0/0 = 1.0 if ``both_empty`` (no true and no predicted objects) else 0.0."""
    if den > 0:
        return float(num) / float(den)
    return 1.0 if both_empty else 0.0


def _check_thresholds(thresholds: Sequence[float]) -> list[float]:
    ts = [float(t) for t in np.atleast_1d(np.asarray(thresholds, dtype=np.float64))]
    if not ts or any(not 0.0 < t <= 1.0 for t in ts):
        raise ValueError(f"IoU thresholds must be a non-empty list of values in (0, 1], got {thresholds}")
    return ts


def _check_lists(gts: Sequence[np.ndarray], preds: Sequence[np.ndarray]) -> None:
    if isinstance(gts, np.ndarray) or isinstance(preds, np.ndarray):
        raise TypeError("gts and preds must be lists of (H, W) label images (wrap a single image in a list)")
    if len(gts) != len(preds):
        raise ValueError(f"gts and preds must have the same length, got {len(gts)} and {len(preds)}")


def image_counts(overlap: Overlap, thresholds: Sequence[float]) -> np.ndarray:
    """TP of one image at each threshold.

    Returns:
        (T,) int64 number of matches with ``IoU >= t``.
    """
    return np.array([match_objects(overlap, threshold=t).tp for t in _check_thresholds(thresholds)], np.int64)


def average_precision(gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], *,
                      thresholds: Sequence[float] = (0.5, 0.75, 0.9)
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cellpose-style AP = TP / (TP + FP + FN) per image and threshold (``cellpose.metrics`` layout).

    Args:
        gts, preds: lists of (H, W) integer label images.
        thresholds: (T,) IoU thresholds; a match needs ``IoU >= t``.

    Returns:
        ap, tp, fp, fn: each (N, T); ap is 1.0 for an image with no true and no predicted objects
        (Cellpose returns NaN there).
    """
    _check_lists(gts, preds)
    ts = _check_thresholds(thresholds)
    n = len(gts)
    tp = np.zeros((n, len(ts)), np.int64)
    n_true = np.zeros((n, 1), np.int64)
    n_pred = np.zeros((n, 1), np.int64)
    for i, (g, p) in enumerate(zip(gts, preds, strict=True)):
        ov = label_overlap(g, p)
        tp[i] = image_counts(ov, ts)
        n_true[i], n_pred[i] = ov.n_gt, ov.n_pred
    fp, fn = n_pred - tp, n_true - tp
    den = tp + fp + fn
    ap = np.where(den > 0, tp / np.maximum(den, 1), 1.0)
    return ap, tp, fp, fn


def _aji_one(ov: Overlap, gt: np.ndarray, pred: np.ndarray, method: str) -> float:
    if method == "cellpose":
        union = int(np.count_nonzero((np.asarray(gt) > 0) | (np.asarray(pred) > 0)))
        iou = ov.iou
        n_min = max(min(ov.n_gt, ov.n_pred), 1)
        cost = -(iou >= 0.5).astype(np.float64) - iou / (2.0 * n_min)
        picked, _ = assign_components(ov.n_gt, ov.n_pred, ov.rows, ov.cols, cost)
        return ratio(int(ov.intersection[picked].sum()), union, both_empty=union == 0)
    # Kumar et al. 2017: each true object with its highest-IoU prediction (predictions may repeat),
    # plus the area of every prediction never chosen added to the union.
    iou = ov.iou
    inter_sum, union_sum = 0, 0
    used = np.zeros(ov.n_pred, bool)
    best = np.full(ov.n_gt, -1, np.int64)
    if iou.size:
        order = np.lexsort((-iou, ov.rows))  # by row, then IoU descending
        first = np.ones(order.size, bool)
        first[1:] = ov.rows[order][1:] != ov.rows[order][:-1]
        best_edges = order[first]
        best[ov.rows[best_edges]] = best_edges
    for i in range(ov.n_gt):
        e = best[i]
        if e < 0:
            union_sum += int(ov.gt_areas[i])
            continue
        inter = int(ov.intersection[e])
        inter_sum += inter
        union_sum += int(ov.gt_areas[i] + ov.pred_areas[ov.cols[e]] - inter)
        used[ov.cols[e]] = True
    union_sum += int(ov.pred_areas[~used].sum())
    return ratio(inter_sum, union_sum, both_empty=ov.n_gt == 0 and ov.n_pred == 0)


def aggregated_jaccard_index(gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], *,
                             method: str = "cellpose") -> np.ndarray:
    """Aggregated Jaccard index per image.

    Args:
        gts, preds: lists of (H, W) integer label images.
        method: "cellpose" (``cellpose.metrics.aggregated_jaccard_index``: sum of the intersections of the
            one-to-one assignment used for AP at 0.5, divided by the union of all foreground pixels) or
            "kumar" (Kumar et al. 2017: each true object with its best-IoU prediction, unused
            predictions added to the union).

    Returns:
        (N,) float64; 1.0 for an image where both are empty.
    """
    if method not in ("cellpose", "kumar"):
        raise ValueError(f"method must be 'cellpose' or 'kumar', got {method!r}")
    _check_lists(gts, preds)
    return np.array([_aji_one(label_overlap(g, p), g, p, method)
                     for g, p in zip(gts, preds, strict=True)], np.float64)


def _scores(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1, AP from counts of any matching shape (broadcast)."""
    empty = (n_true == 0) & (n_pred == 0)

    def div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
        return np.where(den > 0, num / np.maximum(den, 1), np.where(empty, 1.0, 0.0))

    return {
        "precision": div(tp, n_pred), "recall": div(tp, n_true),
        "f1": div(2 * tp, n_true + n_pred), "ap": div(tp, n_true + n_pred - tp),
    }


def evaluate_labels(gts: Sequence[np.ndarray], preds: Sequence[np.ndarray], *,
                    iou_thresholds: Sequence[float] = (0.5, 0.75, 0.9), deepcell: bool = True,
                    coco: bool = True, per_image: bool = True) -> dict:
    """Every label-image metric in one JSON-serialisable dict.

    Args:
        gts: list of N (H_i, W_i) integer ground-truth label images (0 = background).
        preds: list of N predicted label images, same shapes.
        iou_thresholds: thresholds reported in ``by_threshold`` (the mSA grid 0.50:0.95 is always added).
        deepcell: add the DeepCell error breakdown (``deepcell``, match at IoU > 0.6).
        coco: add COCO AP / AP50 / AP75 (``coco``; every predicted object gets score 1.0).
        per_image: add ``per_image``, one dict per image (counts, F1/AP at each threshold, AJI, DeepCell).

    Returns:
        dict with ``n_images``, ``n_true``, ``n_pred``, ``iou_thresholds``, headline numbers ``f1_mean``
        (reference-code F1 at 0.5), ``ap50``/``ap75``/``ap90`` (image-mean AP), ``msa``, ``aji``,
        ``aji_kumar``, and ``by_threshold[key]`` with pooled ``tp fp fn precision recall f1 ap`` and
        image-mean ``precision_image_mean recall_image_mean f1_image_mean ap_image_mean`` plus ``f1_mean``.
    """
    _check_lists(gts, preds)
    if len(gts) == 0:
        raise ValueError("gts and preds are empty: nothing to evaluate")
    ts = sorted(set(_check_thresholds(iou_thresholds)) | set(MSA_THRESHOLDS))
    keys = [threshold_key(t) for t in ts]
    n = len(gts)
    tp = np.zeros((n, len(ts)), np.int64)
    n_true = np.zeros((n, 1), np.int64)
    n_pred = np.zeros((n, 1), np.int64)
    aji = np.zeros(n)
    aji_k = np.zeros(n)
    dc_results = []
    for i, (g, p) in enumerate(zip(gts, preds, strict=True)):
        ov = label_overlap(g, p)
        tp[i] = image_counts(ov, ts)
        n_true[i], n_pred[i] = ov.n_gt, ov.n_pred
        aji[i] = _aji_one(ov, g, p, "cellpose")
        aji_k[i] = _aji_one(ov, g, p, "kumar")
        if deepcell:
            dc_results.append(deepcell_object_metrics(g, p))

    per = _scores(tp, n_true, n_pred)  # each (N, T)
    pooled = _scores(tp.sum(0), n_true.sum(), n_pred.sum())  # each (T,)
    # Reference f1_mean: per-image F1 with NaN (0/0) -> 0.
    den = (tp + 0.5 * ((n_pred - tp) + (n_true - tp))).astype(np.float64)
    f1_ref = np.where(den > 0, tp / np.maximum(den, 1e-300), 0.0)

    by_thr: dict[str, dict] = {}
    for k, key in enumerate(keys):
        d: dict = {"tp": int(tp[:, k].sum()), "fp": int((n_pred[:, 0] - tp[:, k]).sum()),
                   "fn": int((n_true[:, 0] - tp[:, k]).sum())}
        d.update({m: float(pooled[m][k]) for m in ("precision", "recall", "f1", "ap")})
        d.update({f"{m}_image_mean": float(per[m][:, k].mean()) for m in ("precision", "recall", "f1", "ap")})
        d["f1_mean"] = float(f1_ref[:, k].mean())
        by_thr[key] = d

    ap_mean = {key: by_thr[key]["ap_image_mean"] for key in keys}
    out: dict = {
        "n_images": n, "n_true": int(n_true.sum()), "n_pred": int(n_pred.sum()),
        "iou_thresholds": [float(t) for t in ts],
        "match_rule": "one-to-one optimal assignment, IoU >= threshold",
        "f1_mean": by_thr["0.50"]["f1_mean"],
        "ap50": ap_mean["0.50"], "ap75": ap_mean["0.75"], "ap90": ap_mean["0.90"],
        "msa": float(np.mean([ap_mean[threshold_key(t)] for t in MSA_THRESHOLDS])),
        "aji": float(aji.mean()), "aji_kumar": float(aji_k.mean()),
        "by_threshold": by_thr,
    }
    if deepcell:
        out["deepcell"] = deepcell_summary(dc_results)
    if coco:
        out["coco"] = coco_metrics(list(gts), list(preds))
    if per_image:
        rows = []
        for i in range(n):
            row: dict = {"index": i, "n_true": int(n_true[i, 0]), "n_pred": int(n_pred[i, 0]),
                         "tp": {key: int(tp[i, k]) for k, key in enumerate(keys)},
                         "f1": {key: float(per["f1"][i, k]) for k, key in enumerate(keys)},
                         "ap": {key: float(per["ap"][i, k]) for k, key in enumerate(keys)},
                         "aji": float(aji[i]), "aji_kumar": float(aji_k[i])}
            if deepcell:
                dc = dc_results[i].to_dict()
                dc.pop("labels")
                dc.pop("correct_pairs")
                row["deepcell"] = dc
            rows.append(row)
        out["per_image"] = rows
    return out
