"""One click per cell: mean IoU of the mask a click on each cell's innermost pixel gives, per source.

    python scripts/click_study.py MODEL [MODEL ...] --data prepared --split val [--diameter auto] [--json out.json]

Every ground-truth cell of every full validation image gets one positive click at its innermost pixel
(the maximum of its distance transform: where a person clicks), decoded on the tile that holds the cell
(:func:`cellsam.eval.prompts.click_ious`); each mask is compared with its own cell, alone. With
``--diameter auto`` each image's tiles are shown at the scale the size model picks; with ``segment`` at the
scale ``segment``'s default ends at (the size model's, or the one the cells of that pass ask for: what the
web app's click tool uses after "Segment"); with ``true`` at the true median diameter's; without it, at
the image's own scale. A maintainer
script for benchmarks/detector_study.md, not part of the package.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch

from cellsam.config import AUTO
from cellsam.eval.harness import load_prepared
from cellsam.eval.prompts import click_ious
from cellsam.inference.scale import choose_scale, median_diameter
from cellsam.inference.segment import segment
from cellsam.models.protocol import model_tile_size
from cellsam.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--split", default="val")
    ap.add_argument("--diameter", choices=["none", "auto", "segment", "true"], default="none",
                    help="auto: decode each image at the scale the size model picks; segment: at the scale "
                         "segment(diameter='auto') ends at; true: at the true median diameter's")
    ap.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability threshold")
    ap.add_argument("--json")
    args = ap.parse_args()
    items = load_prepared(args.data, args.split)
    results = []
    for path in args.models:
        net = load_model(path).eval()
        native = model_tile_size(net)
        by: dict[str, list[float]] = defaultdict(list)
        for it in items:
            image, gt = it.load()
            tile = None
            if args.diameter == "auto":
                tile, _ = choose_scale(net, image, native, AUTO, torch.device("cpu"))
            elif args.diameter == "segment":
                tile = segment(image, net, normalize=False, channel_axis=0, diameter=AUTO).tile_size
            elif args.diameter == "true":
                tile, _ = choose_scale(net, image, native, median_diameter(gt), torch.device("cpu"))
            ious = list(click_ious(net, image, gt, tile_size=tile, mask_threshold=args.mask_threshold).values())
            by[it.source].extend(ious)
            by["ALL"].extend(ious)
        summary = {k: {"cells": len(v), "mean_iou": float(np.mean(v)), "iou_ge_0.5": float(np.mean(np.array(v) >= 0.5))}
                   for k, v in sorted(by.items())}
        results.append({"model": path, "diameter": args.diameter, "mask_threshold": args.mask_threshold,
                        "by_source": summary})
        print(path)
        for k, v in summary.items():
            print(f"  {k:10s} {v['cells']:5d} cells  mean IoU {v['mean_iou']:.3f}  IoU>=0.5 {v['iou_ge_0.5']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"split": args.split, "images": len(items), "click": "innermost pixel, one positive",
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
