"""DeepCell ``ObjectMetrics``-equivalent error breakdown (the CellSAM paper's F1 at IoU > 0.6).

Written from the description in SPEC section 4 (deepcell-toolbox ``metrics.py``):

1. IoU of every (true, pred) pair that shares pixels. DeepCell only computes pairs whose bounding boxes
   overlap; pairs with overlapping boxes but no shared pixel have IoU 0 there too, so this is equivalent.
2. Small-object boost: if ``0 < IoU <= cutoff1`` and more than half of either object lies inside the
   other, the *modified* IoU of that pair is set to ``cutoff2``.
3. Linear assignment on DeepCell's (n_t+n_p)^2 cost matrix (1 - IoU_mod top-left, its transpose
   bottom-right, ``cutoff1`` on the diagonals of the two "unmatched" blocks, 1 elsewhere). Its optimum
   costs ``const + 2 * sum over matched pairs of (1 - IoU_mod - cutoff1)``, so it equals the
   max-weight matching over pairs with ``IoU_mod > 1 - cutoff1`` (0.6 by default) weighted by
   ``IoU_mod - (1 - cutoff1)``; that reduced problem is what is solved here (exactly, per connected
   component). A pair at exactly 0.6 is *not* matched. In deepcell-toolbox that case is a tie in the
   cost matrix and the solver decides (SPEC reports it unmatched; scipy 1.17 matches a lone pair in a
   literal transcription), so results can differ from deepcell-toolbox only for IoUs of exactly 0.6.
4. The unassigned objects form a graph with an edge where ``IoU_mod >= cutoff2``. Per connected
   component: all degrees <= 1 -> each true is *missed*, each pred *gained* (so a 1-to-1 pair under the
   match IoU is 1 missed + 1 gained); 1 true and >= 2 preds -> *split*; >= 2 trues and 1 pred ->
   *merge*; >= 2 of each -> *catastrophe*.
5. ``correct`` = assignment matches; recall = correct / n_true, precision = correct / n_pred, F1 =
   harmonic mean. Empty cases follow :mod:`cellsam.eval.metrics`: 0/0 is 1.0 when the image has neither
   true nor predicted objects, else 0.0.

Difference from deepcell-toolbox: ``true_det_in_catastrophe`` / ``pred_det_in_catastrophe`` are summed
over all catastrophes of an image (deepcell-toolbox keeps only the last one's count, a bug). Option
``force_event_links`` is not implemented (its default is False).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cellsam.eval.matching import Overlap, assign_components, label_overlap

__all__ = ["DeepCellResult", "deepcell_object_metrics", "deepcell_summary", "COUNT_KEYS"]

COUNT_KEYS = (
    "n_true", "n_pred", "correct", "missed", "gained", "split", "merge", "catastrophe",
    "gained_det_from_split", "missed_det_from_merge", "true_det_in_catastrophe", "pred_det_in_catastrophe",
)


def _ratio(num: float, den: float, *, empty: bool) -> float:
    if den > 0:
        return float(num) / float(den)
    return 1.0 if empty else 0.0


def _prf(correct: int, n_true: int, n_pred: int) -> tuple[float, float, float]:
    empty = n_true == 0 and n_pred == 0
    recall = _ratio(correct, n_true, empty=empty)
    precision = _ratio(correct, n_pred, empty=empty)
    f1 = _ratio(2 * correct, n_true + n_pred, empty=empty)  # = hmean(precision, recall)
    return precision, recall, f1


@dataclass
class DeepCellResult:
    """Error breakdown of one image. Label lists hold the original label values of the objects."""

    n_true: int = 0
    n_pred: int = 0
    correct: int = 0
    missed: int = 0
    gained: int = 0
    split: int = 0
    merge: int = 0
    catastrophe: int = 0
    gained_det_from_split: int = 0
    missed_det_from_merge: int = 0
    true_det_in_catastrophe: int = 0
    pred_det_in_catastrophe: int = 0
    pixel_jaccard: float = 1.0
    correct_pairs: list[tuple[int, int]] = field(default_factory=list)
    labels: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def precision(self) -> float:
        return _prf(self.correct, self.n_true, self.n_pred)[0]

    @property
    def recall(self) -> float:
        return _prf(self.correct, self.n_true, self.n_pred)[1]

    @property
    def f1(self) -> float:
        return _prf(self.correct, self.n_true, self.n_pred)[2]

    def to_dict(self) -> dict:
        """JSON-serialisable dict: counts, precision/recall/F1, pixel Jaccard and the label lists."""
        d = asdict(self)
        d["correct_pairs"] = [list(p) for p in self.correct_pairs]
        d.update(precision=self.precision, recall=self.recall, f1=self.f1)
        return d


def _modified_iou(ov: Overlap, *, cutoff1: float, cutoff2: float) -> np.ndarray:
    iou = ov.iou
    inter = ov.intersection.astype(np.float64)
    true_in_pred = inter / ov.gt_areas[ov.rows]
    pred_in_true = inter / ov.pred_areas[ov.cols]
    boost = (iou > 0) & (iou <= cutoff1) & (np.maximum(true_in_pred, pred_in_true) > 0.5)
    out = iou.copy()
    out[boost] = cutoff2
    return out


def deepcell_object_metrics(gt: np.ndarray, pred: np.ndarray, *, cutoff1: float = 0.4,
                            cutoff2: float = 0.1) -> DeepCellResult:
    """DeepCell object metrics of one image.

    Args:
        gt: (H, W) integer label image, 0 = background (labels need not be consecutive).
        pred: (H, W) integer label image.
        cutoff1: 1 - cutoff1 is the match IoU (strict); also the upper bound of the small-object boost.
        cutoff2: modified IoU given to boosted pairs and edge threshold of the leftover graph.
    """
    if not 0.0 < cutoff1 < 1.0 or not 0.0 < cutoff2 < 1.0:
        raise ValueError(f"cutoff1 and cutoff2 must be in (0, 1), got {cutoff1}, {cutoff2}")
    ov = label_overlap(gt, pred)
    res = DeepCellResult(n_true=ov.n_gt, n_pred=ov.n_pred)
    fg_t, fg_p = np.asarray(gt) > 0, np.asarray(pred) > 0
    union = int(np.count_nonzero(fg_t | fg_p))
    res.pixel_jaccard = _ratio(int(np.count_nonzero(fg_t & fg_p)), union, empty=union == 0)
    res.labels = {k: {"true": [], "pred": []} for k in ("missed", "gained", "split", "merge", "catastrophe")}

    iou_mod = _modified_iou(ov, cutoff1=cutoff1, cutoff2=cutoff2)
    match_iou = 1.0 - cutoff1
    cand = np.flatnonzero(iou_mod > match_iou)
    picked, _ = assign_components(ov.n_gt, ov.n_pred, ov.rows[cand], ov.cols[cand],
                                  -(iou_mod[cand] - match_iou))
    e = cand[picked]
    res.correct = int(e.size)
    res.correct_pairs = [(int(ov.gt_ids[r]), int(ov.pred_ids[c]))
                         for r, c in zip(ov.rows[e], ov.cols[e], strict=True)]

    # Graph of leftovers: nodes 0..n_t-1 trues, n_t..n_t+n_p-1 preds; edges IoU_mod >= cutoff2.
    left_t = np.ones(ov.n_gt, bool)
    left_p = np.ones(ov.n_pred, bool)
    left_t[ov.rows[e]] = False
    left_p[ov.cols[e]] = False
    edge = (iou_mod >= cutoff2) & left_t[ov.rows] & left_p[ov.cols]
    n_t, n = ov.n_gt, ov.n_gt + ov.n_pred
    er, ec = ov.rows[edge], ov.cols[edge] + n_t
    graph = coo_matrix((np.ones(er.size), (er, ec)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    degree = np.bincount(np.concatenate([er, ec]), minlength=n)
    alive = np.concatenate([left_t, left_p])
    for c in np.unique(comp[alive]):
        nodes = np.flatnonzero((comp == c) & alive)
        trues = [int(ov.gt_ids[i]) for i in nodes[nodes < n_t]]
        preds = [int(ov.pred_ids[i - n_t]) for i in nodes[nodes >= n_t]]
        if degree[nodes].max() <= 1:
            res.missed += len(trues)
            res.gained += len(preds)
            res.labels["missed"]["true"] += trues
            res.labels["gained"]["pred"] += preds
        elif len(trues) == 1:
            res.split += 1
            res.gained_det_from_split += len(nodes) - 2
            res.labels["split"]["true"] += trues
            res.labels["split"]["pred"] += preds
        elif len(preds) == 1:
            res.merge += 1
            res.missed_det_from_merge += len(nodes) - 2
            res.labels["merge"]["true"] += trues
            res.labels["merge"]["pred"] += preds
        else:
            res.catastrophe += 1
            res.true_det_in_catastrophe += len(trues)
            res.pred_det_in_catastrophe += len(preds)
            res.labels["catastrophe"]["true"] += trues
            res.labels["catastrophe"]["pred"] += preds
    return res


def deepcell_summary(results: list[DeepCellResult]) -> dict:
    """Pool per-image results: summed counts, pooled precision/recall/F1 (sum correct / sum n), mean
    pixel Jaccard, and the mean of per-image F1 (``f1_image_mean``). JSON-serialisable."""
    out: dict = {k: int(sum(getattr(r, k) for r in results)) for k in COUNT_KEYS}
    p, r, f = _prf(out["correct"], out["n_true"], out["n_pred"])
    out.update(precision=p, recall=r, f1=f, n_images=len(results))
    out["f1_image_mean"] = float(np.mean([x.f1 for x in results])) if results else None
    out["pixel_jaccard_image_mean"] = float(np.mean([x.pixel_jaccard for x in results])) if results else None
    errors = sum(out[k] for k in ("missed", "gained", "split", "merge", "catastrophe"))
    out["error_fractions"] = {k: _ratio(out[k], errors, empty=False)
                              for k in ("missed", "gained", "split", "merge", "catastrophe")}
    return out
