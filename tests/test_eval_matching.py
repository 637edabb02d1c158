"""IoU matrix and one-to-one matching: hand-computed cases, ties, brute force, speed."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from scipy import ndimage

from cellsam.eval.matching import iou_matrix, label_overlap, match_objects


def strips(shape: tuple[int, int], intervals: list[tuple[int, int]],
           labels: list[int] | None = None) -> np.ndarray:
    """Label image of full-height column strips [a, b); the IoU of two strips is a 1-D interval IoU."""
    out = np.zeros(shape, np.int32)
    for k, (a, b) in enumerate(intervals):
        out[:, a:b] = k + 1 if labels is None else labels[k]
    return out


def test_iou_matrix_hand_computed() -> None:
    gt = strips((4, 30), [(0, 10), (10, 20)])
    pred = strips((4, 30), [(2, 12), (20, 25)])
    iou, gid, pid = iou_matrix(gt, pred)
    assert gid.tolist() == [1, 2] and pid.tolist() == [1, 2]
    np.testing.assert_allclose(iou, [[8 / 12, 0.0], [2 / 18, 0.0]])


def test_non_consecutive_labels_and_bool() -> None:
    gt = strips((3, 30), [(0, 10), (10, 20)], labels=[900, 5])
    pred = strips((3, 30), [(0, 10), (12, 20)], labels=[7, 3])
    ov = label_overlap(gt, pred)
    assert ov.gt_ids.tolist() == [5, 900] and ov.pred_ids.tolist() == [3, 7]
    np.testing.assert_allclose(ov.dense_iou(), [[0.8, 0.0], [0.0, 1.0]])  # rows 5, 900; cols 3, 7
    assert ov.gt_areas.tolist() == [30, 30] and ov.pred_areas.tolist() == [24, 30]
    # huge label values use the np.unique path
    big = gt.astype(np.int64) * (1 << 40)
    np.testing.assert_allclose(label_overlap(big, pred).dense_iou(), ov.dense_iou())
    m = label_overlap(gt > 0, pred > 0)
    assert m.n_gt == 1 and m.n_pred == 1 and np.isclose(m.iou[0], 54 / 60)


def test_threshold_is_inclusive_by_default_and_strict_optional() -> None:
    gt = strips((5, 20), [(0, 10)])
    pred = strips((5, 20), [(0, 5)])  # IoU exactly 0.5
    ov = label_overlap(gt, pred)
    assert ov.iou[0] == 0.5
    assert match_objects(ov, threshold=0.5).tp == 1
    assert match_objects(ov, threshold=0.5, strict=True).tp == 0
    pred6 = strips((5, 20), [(0, 6)])  # IoU exactly 0.6
    ov6 = label_overlap(gt, pred6)
    assert match_objects(ov6, threshold=0.6).tp == 1 and match_objects(ov6, threshold=0.6, strict=True).tp == 0


def test_optimal_beats_greedy_and_ties() -> None:
    # G1=[0,10) G2=[10,20); P1=[4,14) P2=[0,4): IoU G1-P1 6/14, G2-P1 4/16 = 0.25, G1-P2 4/10.
    gt = strips((2, 20), [(0, 10), (10, 20)])
    pred = strips((2, 20), [(4, 14), (0, 4)])
    ov = label_overlap(gt, pred)
    m = match_objects(ov, threshold=0.25)
    assert m.tp == 2  # greedy by IoU would match G1-P1 only
    assert sorted(zip(m.gt_index.tolist(), m.pred_index.tolist())) == [(0, 1), (1, 0)]
    assert match_objects(ov, threshold=0.25, strict=True).tp == 1
    assert match_objects(ov, threshold=0.45).tp == 0
    # one GT split exactly in half: two candidates at IoU 0.5, only one may match
    half = label_overlap(strips((2, 20), [(0, 20)]), strips((2, 20), [(0, 10), (10, 20)]))
    assert match_objects(half, threshold=0.5).tp == 1
    assert match_objects(half, threshold=0.5).f1 == 2 * 1 / (1 + 2)  # one of one true, one of two predicted


def test_empty_inputs() -> None:
    z = np.zeros((8, 8), np.int32)
    g = strips((8, 8), [(0, 3)])
    for a, b, nt, npred in [(z, z, 0, 0), (g, z, 1, 0), (z, g, 0, 1)]:
        ov = label_overlap(a, b)
        assert (ov.n_gt, ov.n_pred) == (nt, npred) and ov.dense_iou().shape == (nt, npred)
        assert match_objects(ov, threshold=0.5).tp == 0
        assert match_objects(ov, threshold=0.5).f1 == 0.0  # as the reference code's per-image F1 (no NaN)


def test_bad_inputs() -> None:
    g = np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match="same shape"):
        label_overlap(g, np.zeros((4, 5), np.int32))
    with pytest.raises(TypeError, match="integer dtype"):
        label_overlap(g, np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="negative"):
        label_overlap(g, -np.ones((4, 4), np.int32))
    with pytest.raises(TypeError, match="numpy array"):
        label_overlap(g, [[0]])
    with pytest.raises(ValueError, match="threshold"):
        match_objects(label_overlap(g, g), threshold=0.0)


def random_labels(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    lab = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        h, w = rng.integers(2, 8, size=2)
        lab[y:y + h, x:x + w] = k
    return lab


def brute_tp(gt: np.ndarray, pred: np.ndarray, t: float) -> int:
    """Largest one-to-one matching with IoU >= t, by enumerating every assignment."""
    gi = [v for v in np.unique(gt) if v]
    pi = [v for v in np.unique(pred) if v]
    ok = np.zeros((len(gi), len(pi)), bool)
    for a, u in enumerate(gi):
        for b, v in enumerate(pi):
            inter = np.sum((gt == u) & (pred == v))
            union = np.sum((gt == u) | (pred == v))
            ok[a, b] = inter / union >= t
    best = 0
    slots = list(range(len(pi))) + [None] * len(gi)
    for perm in itertools.permutations(slots, len(gi)):
        best = max(best, sum(1 for a, b in enumerate(perm) if b is not None and ok[a, b]))
    return best


def test_matching_against_brute_force(rng: np.random.Generator) -> None:
    for _ in range(25):
        gt = random_labels(rng, (14, 14), int(rng.integers(0, 5)))
        pred = random_labels(rng, (14, 14), int(rng.integers(0, 5)))
        if rng.random() < 0.5:
            pred = np.where(rng.random(gt.shape) < 0.8, gt, pred)
        ov = label_overlap(gt, pred)
        for t in (0.05, 0.2, 0.34, 0.5, 0.7):
            assert match_objects(ov, threshold=t).tp == brute_tp(gt, pred, t)


def voronoi_labels(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seeds = np.zeros((size, size), np.int32)
    pts = rng.integers(0, size, size=(n, 2))
    seeds[pts[:, 0], pts[:, 1]] = np.arange(1, n + 1)
    dist, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
    lab = seeds[iy, ix]
    lab[dist > 12] = 0
    return lab


def test_speed_2000_objects_1024() -> None:
    gt = voronoi_labels(2100, 1024, seed=0)
    pred = np.roll(gt, 2, axis=1)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        m = match_objects(label_overlap(gt, pred), threshold=0.5)
        times.append(time.perf_counter() - t0)
    assert label_overlap(gt, gt).n_gt > 1900
    assert m.tp > 1900
    assert min(times) < 1.0, times
