"""COCO mask AP (AP@[.5:.95], AP50, AP75) from label images, with up to 10,000 detections per image.

Uses ``faster_coco_eval.COCOeval_faster``, which honours the last ``maxDets`` entry for every statistic.
(pycocotools hard-wires AP@[.5:.95] to maxDets=100 and returns -1 without it; dense cell images have
more than 100 objects, so pycocotools would silently under-report: SPEC section 4.)

Ground truth and detections are built in memory as COCO dicts with RLE masks (``pycocotools.mask``);
the detection list is deep-copied before ``loadRes``, which mutates it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cellsam.eval.matching import check_label_image

__all__ = ["coco_metrics", "masks_from_labels", "build_coco_dicts"]

PredInput = np.ndarray  # (H, W) integer label image or (N, H, W) boolean per-cell masks
ScoreInput = np.ndarray | Sequence[float] | Mapping[int, float] | None


def _rles_from_pixels(labels: np.ndarray, fpos: np.ndarray,
                      shape: tuple[int, int]) -> tuple[np.ndarray, list[dict]]:
    """COCO RLEs of objects given their pixels, without materialising full-image masks.

    Args:
        labels: (P,) int64 object id of each foreground pixel.
        fpos: (P,) int64 column-major (Fortran) flat position ``x * H + y`` of each pixel.
        shape: (H, W).

    Returns:
        ids: (N,) sorted unique object ids; rles: N compressed RLE dicts (``counts`` as ASCII str).
    """
    from pycocotools import mask as mask_utils

    h, w = shape
    order = np.lexsort((fpos, labels))
    lab, pos = labels[order], fpos[order]
    if lab.size == 0:
        return np.zeros(0, np.int64), []
    new_obj = np.ones(lab.size, bool)
    new_obj[1:] = lab[1:] != lab[:-1]
    run_start = new_obj.copy()
    run_start[1:] |= pos[1:] != pos[:-1] + 1
    starts = np.flatnonzero(run_start)
    run_pos = pos[starts]
    run_len = np.diff(np.append(starts, lab.size))
    obj_of_run = np.cumsum(new_obj)[starts] - 1
    first_run = np.flatnonzero(np.r_[True, obj_of_run[1:] != obj_of_run[:-1]])
    ids = lab[new_obj]
    rles: list[dict] = []
    for k, a in enumerate(first_run):
        b = first_run[k + 1] if k + 1 < first_run.size else run_pos.size
        rp, rl = run_pos[a:b], run_len[a:b]
        gaps = rp - np.r_[0, (rp + rl)[:-1]]
        counts = np.empty(2 * rp.size + 1, np.int64)
        counts[0:-1:2], counts[1::2] = gaps, rl
        counts[-1] = h * w - (rp[-1] + rl[-1])
        if counts[-1] == 0:  # object reaches the last pixel: no trailing background run
            counts = counts[:-1]
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts.tolist()}, h, w)
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return ids.astype(np.int64), rles


def _fortran_positions(flat_c: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return (flat_c % w) * h + flat_c // w


def masks_from_labels(labels: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """RLE of every object of a label image (one pass over the pixels).

    Args:
        labels: (H, W) integer label image, 0 = background.

    Returns:
        ids: (N,) int64 sorted label values; rles: N COCO RLE dicts (``counts`` as ASCII str).
    """
    lab = check_label_image(labels, "labels")
    if lab.ndim != 2:
        raise ValueError(f"a label image must be 2-D (H, W), got shape {lab.shape}")
    idx = np.flatnonzero(lab)
    return _rles_from_pixels(lab.ravel()[idx].astype(np.int64), _fortran_positions(idx, lab.shape), lab.shape)


def _masks_to_rles(masks: np.ndarray) -> list[dict]:
    """(N, H, W) masks -> N RLEs (an empty mask gives an all-zero RLE)."""
    from pycocotools import mask as mask_utils

    shape = masks.shape[1:]
    out = []
    for m in masks:
        idx = np.flatnonzero(m)
        if idx.size == 0:
            rle = mask_utils.encode(np.zeros(shape, np.uint8, order="F"))
            rle["counts"] = rle["counts"].decode("ascii")
            out.append(rle)
            continue
        zeros = np.zeros(idx.size, np.int64)
        out.append(_rles_from_pixels(zeros, _fortran_positions(idx, shape), shape)[1][0])
    return out


def _pred_rles(pred: np.ndarray, scores: ScoreInput, shape: tuple[int, int],
               index: int) -> tuple[list[dict], np.ndarray]:
    if not isinstance(pred, np.ndarray):
        raise TypeError(f"preds[{index}] must be a numpy array, got {type(pred).__name__}")
    if pred.ndim == 2:
        if pred.shape != shape:
            raise ValueError(f"preds[{index}] has shape {pred.shape}, ground truth {shape}")
        ids, rles = masks_from_labels(pred)
        if scores is None:
            return rles, np.ones(len(rles))
        if isinstance(scores, Mapping):
            missing = [int(v) for v in ids if int(v) not in scores]
            if missing:
                raise ValueError(f"scores[{index}] has no score for labels {missing[:10]}")
            return rles, np.array([float(scores[int(v)]) for v in ids])
        s = np.asarray(scores, np.float64).ravel()
        if s.size != ids.size:
            raise ValueError(f"scores[{index}] has {s.size} values for {ids.size} labels "
                             "(a sequence is aligned with the sorted nonzero labels)")
        return rles, s
    if pred.ndim == 3:
        if pred.shape[1:] != shape:
            raise ValueError(f"preds[{index}] masks have shape {pred.shape[1:]}, ground truth {shape}")
        if pred.dtype != bool and not np.issubdtype(pred.dtype, np.integer):
            raise TypeError(f"preds[{index}] masks must be boolean (N, H, W), got {pred.dtype}")
        rles = _masks_to_rles(pred)
        if scores is None:
            return rles, np.ones(len(rles))
        if isinstance(scores, Mapping):
            raise TypeError(f"scores[{index}] must be a (N,) sequence for an (N, H, W) mask stack")
        s = np.asarray(scores, np.float64).ravel()
        if s.size != len(rles):
            raise ValueError(f"scores[{index}] has {s.size} values for {len(rles)} masks")
        return rles, s
    raise ValueError(f"preds[{index}] must be (H, W) labels or (N, H, W) masks, got shape {pred.shape}")


def build_coco_dicts(gts: Sequence[np.ndarray], preds: Sequence[PredInput],
                     scores: Sequence[ScoreInput] | None = None) -> tuple[dict, list[dict]]:
    """COCO ground-truth dict and detection list (one category "cell", image ids 1..N).

    Args:
        gts: N (H, W) integer label images.
        preds: N predictions, each an (H, W) label image (one detection per label) or an (N_i, H, W)
            boolean stack of per-cell masks (may overlap).
        scores: None (every detection scores 1.0) or one entry per image: None, an (N_i,) sequence
            (aligned with the masks, or with the sorted nonzero labels of a label image), or a
            {label: score} mapping for a label image.
    """
    if len(gts) != len(preds):
        raise ValueError(f"gts and preds must have the same length, got {len(gts)} and {len(preds)}")
    if scores is not None and len(scores) != len(gts):
        raise ValueError(f"scores must have one entry per image, got {len(scores)} for {len(gts)}")
    from pycocotools import mask as mask_utils

    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    for i, g in enumerate(gts):
        g = check_label_image(g, f"gts[{i}]")
        if g.ndim != 2:
            raise ValueError(f"gts[{i}] must be a 2-D label image, got shape {g.shape}")
        img_id = i + 1
        images.append({"id": img_id, "height": int(g.shape[0]), "width": int(g.shape[1])})
        _, rles = masks_from_labels(g)
        for rle in rles:
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": 1, "segmentation": rle,
                         "area": float(mask_utils.area(rle)),
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
        p_rles, p_scores = _pred_rles(preds[i], None if scores is None else scores[i], g.shape, i)
        for rle, s in zip(p_rles, p_scores, strict=True):
            dets.append({"image_id": img_id, "category_id": 1, "segmentation": rle, "score": float(s)})
    gt_dict = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "cell"}]}
    return gt_dict, dets


def coco_metrics(gts: Sequence[np.ndarray], preds: Sequence[PredInput],
                 scores: Sequence[ScoreInput] | None = None, *, max_dets: int = 10000) -> dict:
    """COCO mask AP over a set of images, with ``maxDets=[max_dets]``.

    Args: as :func:`build_coco_dicts`; ``max_dets``: detections kept per image (highest scores).

    Returns:
        {"ap": AP@[.5:.95], "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar": AR@[.5:.95],
        "max_dets", "n_gt", "n_det"}. A value COCO cannot define (no ground truth at all, or no objects
        in an area range) is None. With no detection at all but some ground truth, every AP is 0.0.
    """
    if int(max_dets) < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    gt_dict, dets = build_coco_dicts(gts, preds, scores)
    base = {"max_dets": int(max_dets), "n_gt": len(gt_dict["annotations"]), "n_det": len(dets)}
    names = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large", "ar")
    if not gt_dict["annotations"]:
        return {**dict.fromkeys(names), **base}
    if not dets:
        return {**dict.fromkeys(names, 0.0), **base}
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(copy.deepcopy(gt_dict))
    coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
    ev = COCOeval_faster(coco_gt, coco_dt, iouType="segm", print_function=lambda *a, **k: None)
    ev.params.maxDets = [int(max_dets)]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    sd = {k: float(v) for k, v in ev.stats_as_dict.items()}
    picked = (sd["AP_all"], sd["AP_50"], sd["AP_75"], sd["AP_small"], sd["AP_medium"], sd["AP_large"],
              sd[f"AR_{int(max_dets)}"])
    return {**{k: (None if v < 0 else v) for k, v in zip(names, picked, strict=True)}, **base}
