"""Does ``polarity="auto"`` pick the better polarity? Every light-background image of the prepared val and
test splits, segmented both ways.

    python scripts/polarity_study.py [MODEL] [--data prepared] [--splits val test] [--json out.json]

For each image whose whole-cell channel has a light background
(:func:`cellsam.inference.polarity.bright_background`; fluorescence images are never checked): the
CellFinder's confidence on the image as it is and inverted (:func:`~cellsam.inference.polarity.detection_confidence`
at the scale chosen for the image as it is, what ``polarity="auto"`` compares), and the whole pipeline's
F1@0.5 with ``polarity="as_is"`` and ``"inverted"``. A maintainer script (``benchmarks/polarity.md``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from cellsam.eval.harness import load_prepared
from cellsam.eval.matching import label_overlap, match_objects
from cellsam.inference.polarity import bright_background, detection_confidence, invert_whole_cell
from cellsam.inference.scale import choose_scale
from cellsam.inference.segment import segment
from cellsam.weights import load_model


def f1(gt: np.ndarray, labels: np.ndarray) -> float:
    return match_objects(label_overlap(gt, labels), threshold=0.5).f1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--json")
    args = ap.parse_args()
    net = load_model(args.model).eval()
    dev = torch.device("cpu")
    thr, native = net.cfg.inference.box_threshold, net.cfg.tile_size
    rows = []
    print("| split | source | image | median blue | confidence as is | inverted | auto | F1 as is | F1 inverted "
          "| right |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for split in args.splits:
        for item in load_prepared(args.data, split):
            image, gt = item.load()
            if not bright_background(image):
                continue
            with torch.inference_mode():
                tile, _ = choose_scale(net, image, native, "auto", dev)
                c0 = detection_confidence(net, image, tile, dev, thr)
                c1 = detection_confidence(net, invert_whole_cell(image), tile, dev, thr)
            f0 = f1(gt, segment(image, net, channel_axis=0, normalize=False, polarity="as_is").labels)
            f_1 = f1(gt, segment(image, net, channel_axis=0, normalize=False, polarity="inverted").labels)
            r = {"split": split, "source": item.source, "image": item.name, "median": float(np.median(image[2])),
                 "confidence": [c0, c1], "auto_inverts": c1 > c0, "f1": [f0, f_1], "right": (c1 > c0) == (f_1 > f0)}
            rows.append(r)
            print(f"| {split} | {item.source} | {item.name.split('/')[-1][:24]} | {r['median']:.2f} | {c0:.3f} | "
                  f"{c1:.3f} | {'inverted' if c1 > c0 else 'as is'} | {f0:.3f} | {f_1:.3f} | "
                  f"{'yes' if r['right'] else 'NO'} |", flush=True)
    print(f"\n{sum(r['right'] for r in rows)} of {len(rows)} images: auto picks the polarity with the higher F1; "
          f"{sum(r['auto_inverts'] for r in rows)} inverted")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
