"""Precision/recall/F1, Cellpose AP, mSA, AJI and the summary dict: hand-computed, empty cases, oracles."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from skimage.segmentation import relabel_sequential

from cellsam.eval.metrics import (
    MSA_THRESHOLDS,
    aggregated_jaccard_index,
    average_precision,
    evaluate_labels,
)
from tests.test_eval_matching import random_labels, strips

Z = np.zeros((6, 30), np.int32)


def test_hand_computed_counts_and_scores() -> None:
    # GT strips [0,10) [10,20) [20,30); preds [0,10) (IoU 1), [12,20) (IoU 0.8), [20,25) (IoU 0.5), [26,28)
    gt = strips((6, 30), [(0, 10), (10, 20), (20, 30)])
    pred = strips((6, 30), [(0, 10), (12, 20), (20, 25), (26, 28)])
    ap, tp, fp, fn = average_precision([gt], [pred], thresholds=[0.5, 0.75, 0.9])
    assert tp.tolist() == [[3, 2, 1]] and fp.tolist() == [[1, 2, 3]] and fn.tolist() == [[0, 1, 2]]
    np.testing.assert_allclose(ap, [[3 / 4, 2 / 5, 1 / 6]])
    r = evaluate_labels([gt], [pred], coco=False)
    b = r["by_threshold"]["0.50"]
    assert (b["tp"], b["fp"], b["fn"]) == (3, 1, 0)
    assert b["precision"] == 0.75 and b["recall"] == 1.0 and np.isclose(b["f1"], 6 / 7)
    assert np.isclose(b["f1_mean"], 3 / (3 + 0.5)) and np.isclose(b["ap"], 0.75)
    assert r["by_threshold"]["0.80"]["tp"] == 2 and r["by_threshold"]["0.85"]["tp"] == 1
    assert np.isclose(r["ap75"], 2 / 5) and np.isclose(r["ap90"], 1 / 6)
    # mSA: TP = 3 at 0.50; 2 at 0.55..0.80 (6 thresholds); 1 at 0.85..0.95 (3 thresholds)
    expected = (3 / 4 + 6 * (2 / 5) + 3 * (1 / 6)) / 10
    assert np.isclose(r["msa"], expected)
    assert len(MSA_THRESHOLDS) == 10 and MSA_THRESHOLDS[1] == 0.55


def test_pooled_vs_image_mean() -> None:
    gt1 = strips((6, 30), [(0, 10), (10, 20)])
    gt2 = strips((6, 30), [(0, 10)])
    r = evaluate_labels([gt1, gt2], [gt1, Z], coco=False, deepcell=False)
    b = r["by_threshold"]["0.50"]
    assert (b["tp"], b["fp"], b["fn"]) == (2, 0, 1)
    assert np.isclose(b["recall"], 2 / 3) and b["precision"] == 1.0
    assert b["recall_image_mean"] == 0.5 and b["precision_image_mean"] == 0.5  # image 2: no preds -> 0.0
    assert b["f1_image_mean"] == 0.5 and b["f1_mean"] == 0.5


def test_empty_conventions() -> None:
    g = strips((6, 30), [(0, 10), (10, 20)])
    # both empty: 1.0 by our convention, 0.0 in the reference f1_mean mode
    r = evaluate_labels([Z], [Z.copy()], coco=True)
    b = r["by_threshold"]["0.50"]
    assert (b["precision"], b["recall"], b["f1"], b["ap"]) == (1.0, 1.0, 1.0, 1.0)
    assert b["f1_mean"] == 0.0 and r["f1_mean"] == 0.0 and r["msa"] == 1.0 and r["aji"] == 1.0
    assert r["coco"]["ap"] is None and r["deepcell"]["f1"] == 1.0
    # empty prediction
    r = evaluate_labels([g], [Z], coco=True)
    b = r["by_threshold"]["0.50"]
    assert (b["tp"], b["fp"], b["fn"]) == (0, 0, 2)
    assert (b["precision"], b["recall"], b["f1"], b["ap"], b["f1_mean"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert r["aji"] == 0.0 and r["coco"]["ap"] == 0.0 and r["deepcell"]["missed"] == 2
    # empty ground truth
    r = evaluate_labels([Z], [g], coco=True)
    b = r["by_threshold"]["0.50"]
    assert (b["tp"], b["fp"], b["fn"]) == (0, 2, 0)
    assert (b["precision"], b["recall"], b["f1"], b["ap"], b["f1_mean"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert r["coco"]["ap"] is None and r["deepcell"]["gained"] == 2
    ap, *_ = average_precision([Z, g, Z], [Z, Z, g])
    np.testing.assert_array_equal(ap, [[1.0] * 3, [0.0] * 3, [0.0] * 3])


def test_aji_hand_computed() -> None:
    gt = strips((2, 30), [(0, 10), (10, 20)])
    pred = strips((2, 30), [(0, 8), (8, 20), (25, 30)])
    # cellpose: pairs (G1,P1) IoU .8 and (G2,P2) IoU 10/12 -> (16 + 20) / union(fg) = 36 / 50
    np.testing.assert_allclose(aggregated_jaccard_index([gt], [pred]), [36 / 50])
    # kumar: G1 best P1 (I 16, U 20), G2 best P2 (I 20, U 24), unused P3 adds 10 -> 36 / 54
    np.testing.assert_allclose(aggregated_jaccard_index([gt], [pred], method="kumar"), [36 / 54])
    with pytest.raises(ValueError, match="method"):
        aggregated_jaccard_index([gt], [pred], method="x")


def test_summary_is_json_and_complete() -> None:
    gt = strips((6, 30), [(0, 10), (10, 20)])
    r = evaluate_labels([gt, gt], [gt, Z], iou_thresholds=[0.3, 0.5])
    s = json.loads(json.dumps(r, allow_nan=False))
    assert "0.30" in s["by_threshold"] and "0.95" in s["by_threshold"]
    assert set(s["coco"]) >= {"ap", "ap50", "ap75"} and len(s["per_image"]) == 2
    assert s["per_image"][1]["deepcell"]["missed"] == 2 and s["per_image"][0]["f1"]["0.50"] == 1.0
    assert s["deepcell"]["correct"] == 2
    assert np.isclose(s["coco"]["ap50"], 51 / 101)  # recall 0.5 at precision 1, 101-point interpolation


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        evaluate_labels([Z], [Z, Z])
    with pytest.raises(TypeError, match="lists"):
        evaluate_labels(Z, Z)
    with pytest.raises(ValueError, match="empty"):
        evaluate_labels([], [])
    with pytest.raises(ValueError, match="thresholds"):
        average_precision([Z], [Z], thresholds=[1.5])
    with pytest.raises(ValueError, match="same shape"):
        evaluate_labels([Z], [np.zeros((3, 3), np.int32)])


# ---- oracles on random label images -------------------------------------------------------------


def _random_pairs(seed: int, n_images: int = 30) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for i in range(n_images):
        g = relabel_sequential(random_labels(rng, (40, 40), int(rng.integers(0, 20))))[0]
        if i % 3 == 0:
            p = random_labels(rng, (40, 40), int(rng.integers(0, 20)))
        else:
            p = np.roll(g, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
            p = np.where(rng.random(g.shape) < 0.1, 0, p)
        gts.append(g.astype(np.int32))
        preds.append(relabel_sequential(p)[0].astype(np.int32))
    return gts, preds


def _brute_cellpose(gt: np.ndarray, pred: np.ndarray, thresholds: list[float]) -> tuple[list[int], float]:
    """TP per threshold and Cellpose-AJI by enumerating all assignments (tiny images only)."""
    gi, pi = [v for v in np.unique(gt) if v], [v for v in np.unique(pred) if v]
    inter = np.array([[np.sum((gt == u) & (pred == v)) for v in pi] for u in gi], float)
    inter = inter.reshape(len(gi), len(pi))
    area_g = np.array([np.sum(gt == u) for u in gi]).reshape(-1, 1)
    area_p = np.array([np.sum(pred == v) for v in pi]).reshape(1, -1)
    iou = inter / np.maximum(area_g + area_p - inter, 1)
    slots = list(range(len(pi))) + [None] * len(gi)
    tps, best_key, best_inter = [], None, 0.0
    perms = [[(a, b) for a, b in enumerate(p) if b is not None] for p in itertools.permutations(slots, len(gi))]
    for t in thresholds:
        tps.append(max((sum(iou[a, b] >= t for a, b in m) for m in perms), default=0))
    for m in perms:
        key = (sum(iou[a, b] >= 0.5 for a, b in m), round(sum(iou[a, b] for a, b in m), 12))
        if best_key is None or key > best_key:
            best_key, best_inter = key, sum(inter[a, b] for a, b in m)
    union = np.sum((gt > 0) | (pred > 0))
    return tps, (best_inter / union if union else 1.0)


def test_against_brute_force_oracle() -> None:
    rng = np.random.default_rng(3)
    th = [0.1, 0.3, 0.5, 0.75]
    for _ in range(20):
        g = relabel_sequential(random_labels(rng, (12, 12), int(rng.integers(0, 5))))[0]
        p = relabel_sequential(random_labels(rng, (12, 12), int(rng.integers(0, 5))))[0]
        if rng.random() < 0.5:
            p = relabel_sequential(np.where(rng.random(g.shape) < 0.7, g, p))[0]
        tps, aji = _brute_cellpose(g, p, th)
        _, tp, _, _ = average_precision([g], [p], thresholds=th)
        assert tp[0].tolist() == tps
        assert np.isclose(aggregated_jaccard_index([g], [p])[0], aji)


def test_against_cellpose_metrics() -> None:
    cp = pytest.importorskip("cellpose.metrics")
    gts, preds = _random_pairs(seed=1)
    th = [0.1, 0.3, 0.5, 0.75, 0.9]
    ap, tp, fp, fn = average_precision(gts, preds, thresholds=th)
    cap, ctp, cfp, cfn = cp.average_precision(gts, preds, threshold=th)
    np.testing.assert_array_equal(tp, ctp)
    np.testing.assert_array_equal(fp, cfp)
    np.testing.assert_array_equal(fn, cfn)
    ok = ~np.isnan(cap)
    np.testing.assert_allclose(ap[ok], cap[ok], rtol=1e-6)
    assert np.all(ap[~ok] == 1.0)  # both empty: Cellpose NaN, ours 1.0
    aji, caji = aggregated_jaccard_index(gts, preds), cp.aggregated_jaccard_index(gts, preds)
    okj = ~np.isnan(caji)
    np.testing.assert_allclose(aji[okj], caji[okj], rtol=1e-9)
