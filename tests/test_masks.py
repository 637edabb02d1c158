"""Per-cell postprocessing and label assembly by arg-max over logits."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam.ops.masks import (
    CellMask,
    area_floor,
    clean_cell_mask,
    clean_labels,
    fill_holes,
    keep_largest_component,
    label_boxes,
    logit_threshold,
    merge_by_argmax,
    outlines,
)


def test_logit_threshold_matches_sigmoid() -> None:
    for p in (0.1, 0.5, 0.9):
        t = logit_threshold(p)
        assert abs(1 / (1 + np.exp(-t)) - p) < 1e-9
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="mask_threshold"):
            logit_threshold(bad)


def test_fill_holes_and_keep_largest_component() -> None:
    m = np.zeros((20, 20), bool)
    m[2:12, 2:12] = True
    m[5:8, 5:8] = False  # a hole
    m[15:17, 15:17] = True  # an island
    assert fill_holes(m)[6, 6] and not fill_holes(np.zeros((3, 3), bool)).any()
    big = keep_largest_component(m)
    assert not big[16, 16] and big[2, 2]
    logits = np.where(m, 3.0, -3.0)
    clean = clean_cell_mask(logits, mask_threshold=0.5)
    assert clean.sum() == 100 and not clean[16, 16]
    # a higher probability threshold shrinks the mask
    graded = np.where(m, 1.0, -3.0)
    graded[2:12, 2:4] = 0.1  # prob 0.52
    assert clean_cell_mask(graded, mask_threshold=0.6).sum() < clean_cell_mask(graded, mask_threshold=0.5).sum()
    assert not clean_cell_mask(np.full((4, 4), -1.0)).any()


def test_merge_is_argmax_over_logits_not_last_wins() -> None:
    a = b = np.ones((10, 10), bool)
    la = np.full((10, 10), 5.0, np.float32)
    lb = np.full((10, 10), 1.0, np.float32)
    lb[:, 3:5] = 9.0  # b is more confident than a on its columns 3..4 (image x 8..9)
    # a covers x 0..9, b covers x 5..14; they overlap on x 5..9
    for order in ([(0, 0, a, la), (0, 5, b, lb)], [(0, 5, b, lb), (0, 0, a, la)]):
        labels = merge_by_argmax(order, (10, 15))
        id_a, id_b = (1, 2) if order[0][1] == 0 else (2, 1)
        assert (labels[:, :8] == id_a).all()  # overlap x 5..7: a's logit 5 > b's 1 (last box does not win)
        assert (labels[:, 8:10] == id_b).all()  # b's logit 9 > 5
        assert (labels[:, 10:] == id_b).all()


def test_merge_respects_masks() -> None:
    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    labels = merge_by_argmax([(0, 0, m, np.full((5, 5), 9.0, np.float32))], (5, 5))
    assert labels.sum() == 9  # logits outside the mask do not claim pixels


def test_clean_labels_drops_small_keeps_largest_part_and_renumbers() -> None:
    lab = np.zeros((30, 30), np.int32)
    lab[0:10, 0:10] = 3
    lab[20:22, 20:22] = 3  # a detached fragment of 3
    lab[12:14, 0:3] = 5  # 6 px: too small
    lab[15:25, 0:10] = 7
    out, old = clean_labels(lab, min_area=10)
    assert old.tolist() == [3, 7]
    assert out.max() == 2 and (out[0:10, 0:10] == 1).all() and out[21, 21] == 0 and (out[15:25, 0:10] == 2).all()
    assert out[12, 0] == 0 and out.dtype == np.int32
    empty, old = clean_labels(np.zeros((4, 4), np.int32), min_area=5)
    assert empty.max() == 0 and old.size == 0


def test_relative_area_floor_drops_specks_far_below_the_typical_cell() -> None:
    assert area_floor(np.array([100, 100, 120, 10, 3]), min_area=5, min_area_rel=0.15) == 15.0  # median of 10..120
    assert area_floor(np.array([100, 10]), min_area=15, min_area_rel=0.15) == 15.0  # 10 px is not in the median
    assert area_floor(np.array([100, 100]), min_area=15) == 15.0  # rel 0: off
    assert area_floor(np.zeros(0, np.int64), min_area=0, min_area_rel=0.5) == 1.0  # no cells: nothing to raise
    lab = np.zeros((40, 40), np.int32)
    lab[0:10, 0:10] = 1  # 100 px
    lab[0:10, 20:30] = 2  # 100 px
    lab[20:30, 0:10] = 4  # 100 px
    lab[35:38, 35:39] = 9  # 12 px: 0.12 of the median
    out, old = clean_labels(lab, min_area=5, min_area_rel=0.15)
    assert old.tolist() == [1, 2, 4] and out[36, 36] == 0 and out.max() == 3
    out, old = clean_labels(lab, min_area=5, min_area_rel=0.1)
    assert old.tolist() == [1, 2, 4, 9] and out[36, 36] == 4
    assert clean_labels(lab, min_area=5)[1].tolist() == [1, 2, 4, 9]  # off by default


def test_outlines_boxes_and_cellmask() -> None:
    lab = np.zeros((10, 10), np.int32)
    lab[2:7, 2:7] = 1
    lab[2:7, 7:9] = 2
    edge = outlines(lab)
    assert edge[2, 2] and edge[6, 4] and not edge[4, 4] and not edge[0, 0]
    assert edge[4, 6] and edge[4, 7]  # the border between two touching cells is drawn on both
    np.testing.assert_array_equal(label_boxes(lab, 3), [[2, 2, 7, 7], [7, 2, 9, 7], [0, 0, 0, 0]])
    cm = CellMask(2, 3, np.ones((2, 2), bool))
    full = cm.to_full((6, 6))
    assert cm.area == 4 and full.sum() == 4 and full[2:4, 3:5].all()
