"""What are the pipeline's false cells, and what does a relative minimum area do to them?
(``benchmarks/min_area_rel.md``)

    python scripts/false_positive_study.py [MODEL] [--data prepared] [--split val] [--fracs 0.1 0.15 0.2]
        [--json out.json]

Every image of the split is segmented once with ``min_area_rel=0`` (the other settings: the model's
defaults). Per source: the predicted cells matched at IoU >= 0.5 and the unmatched ones, split by the part
of their pixels that lies on annotated cells (< 0.1: a cell where nothing is annotated), with the median
areas; then the per-image F1@0.5 mean if the cells under ``frac`` x the median area of the image's cells
were dropped (:func:`cellsam.ops.masks.area_floor`, what ``segment(min_area_rel=frac)`` applies). Dropping a
cell does not change the other matches (a match at IoU >= 0.5 is unique), so that F1 is exact for these
segmentations; ``segment(min_area_rel=frac)`` itself may differ slightly, because with ``diameter="auto"``
the cells that pass also set the second pass's scale. A maintainer script.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from cellsam.eval.harness import load_prepared
from cellsam.eval.matching import label_overlap, match_objects
from cellsam.inference.segment import segment
from cellsam.ops.masks import area_floor
from cellsam.weights import load_model


def image_row(gt: np.ndarray, labels: np.ndarray) -> dict:
    """One image's predicted cells: area, matched (IoU >= 0.5), fraction of pixels on annotated cells."""
    ov = label_overlap(gt, labels)
    m = match_objects(ov, threshold=0.5)
    inter = np.zeros(ov.pred_ids.size)
    np.add.at(inter, ov.cols, ov.intersection)
    matched = np.zeros(ov.pred_ids.size, bool)
    matched[m.pred_index] = True
    return {"n_gt": int(m.n_gt), "areas": ov.pred_areas.tolist(), "matched": matched.tolist(),
            "on_gt": (inter / np.maximum(ov.pred_areas, 1)).tolist()}


def with_floor(row: dict, frac: float, min_area: int = 15) -> tuple[float, int, int]:
    """The image's F1@0.5 after dropping its cells under ``area_floor(areas, min_area, frac)``, and the numbers
    of true (matched) and false cells dropped."""
    areas, matched = np.asarray(row["areas"], np.int64), np.asarray(row["matched"], bool)
    keep = areas >= area_floor(areas, min_area=min_area, min_area_rel=frac)
    tp, n_pred = int((keep & matched).sum()), int(keep.sum())
    return 2 * tp / max(row["n_gt"] + n_pred, 1), int((~keep & matched).sum()), int((~keep & ~matched).sum())


def summary(rows: list[dict], fracs: list[float]) -> dict:
    """Counts, median areas and the F1@0.5 mean at each floor for a list of image rows."""
    areas = np.concatenate([np.asarray(r["areas"], np.int64) for r in rows] + [np.zeros(0, np.int64)])
    matched = np.concatenate([np.asarray(r["matched"], bool) for r in rows] + [np.zeros(0, bool)])
    on_gt = np.concatenate([np.asarray(r["on_gt"], float) for r in rows] + [np.zeros(0)])
    nowhere = ~matched & (on_gt < 0.1)

    def med(mask: np.ndarray) -> float | None:
        return float(np.median(areas[mask])) if mask.any() else None

    return {"images": len(rows), "true": int(matched.sum()), "false_on_no_cell": int(nowhere.sum()),
            "false_on_cells": int((~matched & ~nowhere).sum()), "median_area_true": med(matched),
            "median_area_false_on_no_cell": med(nowhere),
            "f1_mean": {f"{f:g}": float(np.mean([with_floor(r, f)[0] for r in rows])) for f in [0.0, *fracs]},
            "true_dropped": {f"{f:g}": sum(with_floor(r, f)[1] for r in rows) for f in fracs},
            "false_dropped": {f"{f:g}": sum(with_floor(r, f)[2] for r in rows) for f in fracs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--split", default="val")
    ap.add_argument("--fracs", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.25])
    ap.add_argument("--json")
    args = ap.parse_args()
    net = load_model(args.model).eval()
    by_source: dict[str, list[dict]] = defaultdict(list)
    for item in load_prepared(args.data, args.split):
        image, gt = item.loader()
        seg = segment(image, net, channel_axis=0, normalize=False, min_area_rel=0.0)
        by_source[item.source].append(image_row(gt, seg.labels))
    out = {src: summary(rows, args.fracs) for src, rows in sorted(by_source.items())}
    out["ALL"] = summary([r for rows in by_source.values() for r in rows], args.fracs)
    for src, s in out.items():
        f1 = "  ".join(f"{k}: {v:.3f}" for k, v in s["f1_mean"].items())
        lost = "  ".join(f"{k}: {v} / {s['false_dropped'][k]}" for k, v in s["true_dropped"].items())
        print(f"{src:10s} images {s['images']:3d}  true {s['true']:5d}  false on no cell {s['false_on_no_cell']:4d} "
              f"(median area {s['median_area_false_on_no_cell']}, true {s['median_area_true']})  "
              f"false on cells {s['false_on_cells']:4d}\n           F1@0.5 mean by min_area_rel  {f1}\n"
              f"           true / false cells dropped  {lost}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
