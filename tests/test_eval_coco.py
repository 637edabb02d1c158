"""COCO mask AP with maxDets=[10000] (faster-coco-eval), RLE building, scores, and a pycocotools check."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from cellsam.eval.coco import build_coco_dicts, coco_metrics, masks_from_labels


def grid_labels(n_rows: int = 15, n_cols: int = 20, cell: int = 6, gap: int = 2) -> np.ndarray:
    """n_rows * n_cols square cells (300 by default) on a regular grid."""
    step = cell + gap
    lab = np.zeros((n_rows * step, n_cols * step), np.int32)
    k = 0
    for r in range(n_rows):
        for c in range(n_cols):
            k += 1
            lab[r * step:r * step + cell, c * step:c * step + cell] = k
    return lab


def test_rle_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    lab = (rng.integers(0, 6, size=(37, 23)) * (rng.random((37, 23)) < 0.5)).astype(np.int32)
    lab[-1, -1] = 4  # an object touching the last pixel
    ids, rles = masks_from_labels(lab)
    assert ids.tolist() == sorted(set(lab[lab > 0].tolist()))
    for v, rle in zip(ids, rles, strict=True):
        ref = mask_utils.encode(np.asfortranarray((lab == v).astype(np.uint8)))
        assert rle["counts"] == ref["counts"].decode("ascii") and rle["size"] == [37, 23]


def test_300_perfect_objects_give_one() -> None:
    gt = grid_labels()
    assert gt.max() == 300
    r = coco_metrics([gt], [gt])
    assert (r["ap"], r["ap50"], r["ap75"]) == (1.0, 1.0, 1.0)
    assert r["n_gt"] == 300 and r["n_det"] == 300 and r["max_dets"] == 10000
    # the pycocotools pitfall: keeping only 100 detections caps recall at 1/3
    capped = coco_metrics([gt], [gt], max_dets=100)
    assert capped["ap"] < 0.4 and capped["ap50"] < 0.4


def test_scores_and_wrong_masks_lower_ap() -> None:
    gt = grid_labels()
    ids, _ = masks_from_labels(gt)
    masks = np.stack([gt == v for v in ids])
    wrong = np.arange(0, 300, 10)  # 30 wrong masks: shifted by 3 px (IoU 0.33 with their cell)
    masks[wrong] = np.roll(masks[wrong], 3, axis=2)
    loose = np.arange(5, 300, 10)  # 30 loose masks: shifted by 1 px (IoU 30/42 = 0.71)
    masks[loose] = np.roll(masks[loose], 1, axis=2)
    rng = np.random.default_rng(0)
    scores = rng.random(300)
    shuffled = coco_metrics([gt], [masks], [scores])
    assert 0.5 < shuffled["ap50"] < 1.0 and shuffled["ap75"] < shuffled["ap50"]
    assert shuffled["ap75"] < shuffled["ap"] < shuffled["ap50"]  # loose masks count up to IoU 0.70
    good_first = scores.copy()
    good_first[wrong] -= 2.0  # wrong masks ranked last
    bad_first = scores.copy()
    bad_first[wrong] += 2.0  # wrong masks ranked first
    hi = coco_metrics([gt], [masks], [good_first])
    lo = coco_metrics([gt], [masks], [bad_first])
    assert np.isclose(hi["ap50"], 0.9, atol=0.01)  # recall 0.9 at precision 1
    assert lo["ap50"] < shuffled["ap50"] < hi["ap50"]


def test_label_image_scores_mapping_and_errors() -> None:
    gt = grid_labels(2, 2)
    pred = gt.copy()
    pred[pred == 4] = 0
    pred[14:16, :] = 9  # a false positive in the bottom gap rows
    d_gt, dets = build_coco_dicts([gt], [pred], [{1: 0.9, 2: 0.8, 3: 0.7, 9: 0.1}])
    assert [d["score"] for d in dets] == [0.9, 0.8, 0.7, 0.1] and len(d_gt["annotations"]) == 4
    assert d_gt["annotations"][0]["area"] == 36.0 and d_gt["annotations"][0]["iscrowd"] == 0
    r = coco_metrics([gt], [pred], [{1: 0.9, 2: 0.8, 3: 0.7, 9: 0.1}])
    assert np.isclose(r["ap50"], 0.7525, atol=1e-3)  # recall 0.75 at precision 1: 76/101
    with pytest.raises(ValueError, match="no score"):
        coco_metrics([gt], [pred], [{1: 0.9}])
    with pytest.raises(ValueError, match="values for"):
        coco_metrics([gt], [pred], [[0.5]])
    with pytest.raises(ValueError, match="shape"):
        coco_metrics([gt], [gt[:5]])
    with pytest.raises(ValueError, match="same length"):
        coco_metrics([gt], [])


def test_dets_not_mutated_and_pycocotools_agrees_at_50_75() -> None:
    pytest.importorskip("pycocotools.cocoeval")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = grid_labels(6, 6)
    ids, _ = masks_from_labels(gt)
    masks = np.stack([gt == v for v in ids])
    masks[::4] = np.roll(masks[::4], 2, axis=1)  # IoU 0.5 shifts
    scores = np.random.default_rng(1).random(len(masks))
    d_gt, dets = build_coco_dicts([gt], [masks], [scores])
    before = copy.deepcopy(dets)
    ours = coco_metrics([gt], [masks], [scores])
    assert dets == before
    coco_gt = COCO()
    coco_gt.dataset = copy.deepcopy(d_gt)
    coco_gt.createIndex()
    ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "segm")
    ev.params.maxDets = [1, 100, 10000]  # stats[1], stats[2] use maxDets[2]; fewer than 100 objects here
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert np.isclose(ours["ap50"], ev.stats[1]) and np.isclose(ours["ap75"], ev.stats[2])
    assert np.isclose(ours["ap"], ev.stats[0])
