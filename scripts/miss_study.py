"""Why the detector misses cells: each true box of the validation crops put in one class.

    python scripts/miss_study.py MODEL [--scale native|true] [--box-threshold 0.3] [--data prepared] [--json out.json]

Each prepared val tile (at most 150) goes through the model's encoder and CellFinder, either at its own
scale (``native``: the tile's 256 px centre crop, as ``scripts/box_recall.py``) or at the model's working
scale (``true``: the tile resized so that its median cell diameter becomes the model's ``cell_diameter``,
then its 256 px centre crop, padded if smaller). Boxes scoring above the box threshold are matched
one-to-one to the true boxes (Hungarian on IoU, a match at IoU >= 0.5). Every unmatched true box is put
in the first class that applies:

* ``cut_by_crop``: the cell touches the crop's border (or the padding of a small tile), so only a part of
  it is seen; the pipeline's overlapping tiles see such a cell whole in another tile, except at the
  image's own border;
* ``peak_in_cell_bad_box``: a peak above the threshold has its centre inside the cell, but no such box
  reaches IoU 0.5 with it (the size or the position is wrong);
* ``peak_in_cell_taken``: such a box reaches IoU 0.5 but was matched to another cell;
* ``right_box_low_score``: a box at IoU >= 0.5 exists among the peaks under the threshold (down to 0.02);
* ``weak_peak_bad_box``: only peaks under the threshold lie inside the cell, none with a fitting box;
* ``no_peak``: no peak at all inside the cell.

Unmatched boxes above the threshold are false positives, split by their best IoU with a true box. A
maintainer script for the detector study (``benchmarks/training/v6/README.md``), not part of the package.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from cellsam.inference.scale import median_diameter
from cellsam.ops.boxes import box_iou
from cellsam.train.dataset import PreparedTiles
from cellsam.train.targets import labels_to_targets
from cellsam.weights import load_model

CROP = 256


def working_scale(image: torch.Tensor, labels: torch.Tensor,
                  reference: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(C,T,T) image, (T,T) labels -> both resized to cells of ``reference`` px, centre crop of CROP, and
    the side of the crop that holds image (the rest is padding)."""
    d = median_diameter(labels.numpy()) or reference
    n = max(int(round(image.shape[-1] * min(max(reference / d, 0.35), 3.0))), 8)
    im = F.interpolate(image[None], (n, n), mode="bilinear", align_corners=False)[0]
    lb = F.interpolate(labels[None, None].float(), (n, n), mode="nearest")[0, 0].long()
    visible = min(n, CROP)
    if n < CROP:
        im, lb, n = F.pad(im, (0, CROP - n, 0, CROP - n)), F.pad(lb, (0, CROP - n, 0, CROP - n)), CROP
    o = (n - CROP) // 2
    return im[:, o : o + CROP, o : o + CROP], lb[o : o + CROP, o : o + CROP], visible


def bad_box_shape(p: np.ndarray, t: np.ndarray, iou_all: np.ndarray, cand: np.ndarray, j: int) -> str:
    """How the best of the boxes centred in true cell ``j`` is wrong: another cell's box (IoU >= 0.5
    with a neighbour), too big / too small (area ratio > 1.6 / < 1/1.6), too elongated or too flat
    (aspect ratio off by > 1.6x), else shifted."""
    i = cand[int(np.argmax(iou_all[cand, j]))]
    if iou_all[i].max() >= 0.5:
        return "neighbours_box"
    pw, ph = p[i, 2] - p[i, 0], p[i, 3] - p[i, 1]
    tw, th = t[j, 2] - t[j, 0], t[j, 3] - t[j, 1]
    area = (pw * ph) / max(tw * th, 1e-6)
    aspect = (pw / max(ph, 1e-6)) / max(tw / max(th, 1e-6), 1e-6)
    if area > 1.6:
        return "too_big"
    if area < 1 / 1.6:
        return "too_small"
    return "wrong_aspect" if aspect > 1.6 or aspect < 1 / 1.6 else "shifted"


def classify(pred: torch.Tensor, scores: np.ndarray, true: torch.Tensor, thr: float, visible: int = CROP,
             shapes: Counter | None = None) -> tuple[Counter, Counter]:
    """Classes of the unmatched true boxes (and ``matched``), and of the false positives; the bad
    boxes' :func:`bad_box_shape` counted in ``shapes`` when given. ``visible``: the side of the crop
    that holds image; a true box within 1 px of its edge is cut by the crop."""
    shapes = Counter() if shapes is None else shapes
    cats: Counter = Counter()
    fps: Counter = Counter()
    hi = scores > thr
    iou_all = box_iou(pred, true).numpy() if len(pred) and len(true) else np.zeros((len(pred), len(true)))
    iou_hi = iou_all[hi]
    matched, pm = np.zeros(len(true), bool), np.zeros(len(iou_hi), bool)
    if iou_hi.size:
        r, c = linear_sum_assignment(-iou_hi)
        ok = iou_hi[r, c] >= 0.5
        matched[c[ok]], pm[r[ok]] = True, True
    p, t = pred.numpy(), true.numpy()
    cx, cy = (p[:, 0] + p[:, 2]) / 2, (p[:, 1] + p[:, 3]) / 2
    cut = (t[:, :2] <= 1).any(axis=1) | (t[:, 2:] >= visible - 1).any(axis=1)
    for j in range(len(t)):
        if matched[j]:
            cats["matched"] += 1
            continue
        if cut[j]:
            cats["cut_by_crop"] += 1
            continue
        inside = (cx >= t[j, 0]) & (cx <= t[j, 2]) & (cy >= t[j, 1]) & (cy <= t[j, 3])
        if (inside & hi).any():
            key = "peak_in_cell_taken" if iou_all[inside & hi, j].max() >= 0.5 else "peak_in_cell_bad_box"
            if key == "peak_in_cell_bad_box":
                shapes[bad_box_shape(p, t, iou_all, np.nonzero(inside & hi)[0], j)] += 1
        elif ((iou_all[:, j] >= 0.5) & ~hi).any():
            key = "right_box_low_score"
        else:
            key = "weak_peak_bad_box" if inside.any() else "no_peak"
        cats[key] += 1
    for i in np.nonzero(~pm)[0]:
        best = iou_hi[i].max() if iou_hi.shape[1] else 0.0
        fps["fp_iou>=0.3" if best >= 0.3 else "fp_iou_0.1-0.3" if best >= 0.1 else "fp_no_cell"] += 1
    return cats, fps


def study(model: str, scale: str, thr: float, max_tiles: int, data: str = "prepared") -> dict:
    net = load_model(model).eval()
    reference = float(net.cfg.inference.cell_diameter or 0) or 30.0
    ds = PreparedTiles(data, "val", crop_size=None if scale == "true" else CROP, max_items=max_tiles)
    cats: dict[str, Counter] = defaultdict(Counter)
    fps: dict[str, Counter] = defaultdict(Counter)
    shapes: dict[str, Counter] = defaultdict(Counter)
    with torch.inference_mode():
        for k in range(len(ds)):
            image, target = ds[k]
            src = ds.tiles[ds.index[k]].get("source", "?")
            visible = CROP
            if scale == "true":
                image, labels, visible = working_scale(image, target["labels_image"], reference)
                target = labels_to_targets(labels)
            x = net.preprocess(image[None])
            det = net.postprocess_detections(net.detect(net.encode(x), x), box_threshold=0.02)[0]
            c, f = classify(det["boxes"], det["scores"].numpy(), target["boxes_xyxy"], thr, visible, shapes[src])
            cats[src].update(c)
            fps[src].update(f)
    return {"model": model, "scale": scale, "box_threshold": thr, "true_cells": {s: dict(v) for s, v in cats.items()},
            "false_positives": {s: dict(v) for s, v in fps.items()},
            "bad_box_shapes": {s: dict(v) for s, v in shapes.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--scale", choices=["native", "true"], default="true")
    ap.add_argument("--box-threshold", type=float, default=0.3)
    ap.add_argument("--max-tiles", type=int, default=150)
    ap.add_argument("--data", default="prepared", help="prepared data folder (a model's own colour rule)")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = study(args.model, args.scale, args.box_threshold, args.max_tiles, args.data)
    for src, c in sorted(out["true_cells"].items()):
        n = sum(c.values())
        misses = n - c.get("matched", 0)
        print(f"{src}: {n} cells, recall {c.get('matched', 0) / max(n, 1):.3f}; "
              f"false positives {out['false_positives'].get(src, {})}")
        for key, v in sorted(c.items()):
            if key != "matched":
                print(f"   {key:22s} {v:5d}  {v / max(n, 1):.3f} of cells, {v / max(misses, 1):.2f} of misses")
        print(f"   bad boxes: {out['bad_box_shapes'].get(src, {})}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
