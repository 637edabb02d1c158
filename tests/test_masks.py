"""Per-cell postprocessing and label assembly by arg-max over logits."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam.ops.masks import (
    CellMask,
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
