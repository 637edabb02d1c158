"""Any magnification (issue #22): validation images rescaled by 0.5x, 1x and 2x (labels nearest-neighbour),
segmented with diameter=None (no rescaling), "auto" and the true diameter (the median equivalent diameter
of the rescaled ground truth); F1@0.5 mean per source and the seconds per image of each.

    python scripts/scale_study.py MODEL --data prepared --scales 0.5 1 2 --json benchmarks/scale_study.json \
        --markdown benchmarks/scale_study.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cellsam.eval.harness import load_prepared
from cellsam.eval.metrics import evaluate_labels
from cellsam.inference.scale import choose_scale, median_diameter
from cellsam.inference.segment import segment
from cellsam.weights import load_model


def rescale_pair(image: np.ndarray, labels: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) float image (bilinear, antialiased) and (H, W) labels (nearest) resized by ``scale``."""
    if scale == 1.0:
        return image, labels
    h, w = labels.shape
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    img = F.interpolate(torch.from_numpy(np.ascontiguousarray(image, np.float32))[None], size=size, mode="bilinear",
                        align_corners=False, antialias=scale < 1)[0].clamp_(0, 1).numpy()
    lab = F.interpolate(torch.from_numpy(labels.astype(np.float32))[None, None], size=size, mode="nearest")[0, 0]
    return img, lab.numpy().astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--split", default="val")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--modes", nargs="+", default=["none", "auto", "true"])
    ap.add_argument("--images", type=int, default=0, help="0: all; else this many spread over the sorted list")
    ap.add_argument("--json", required=True)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    model = load_model(args.model).eval()
    items = load_prepared(args.data, args.split)
    if args.images:
        step = max(1, len(items) // args.images)
        items = items[::step][: args.images]
    sources = sorted({it.source for it in items})
    rows = []
    for scale in args.scales:
        pairs = [rescale_pair(*it.load(), scale) for it in items]
        for mode in args.modes:
            preds, secs, diams, tiles, first = [], [], [], [], []
            for img, gt in pairs:
                diameter = {"none": None, "auto": "auto", "true": median_diameter(gt)}[mode]
                t = time.perf_counter()
                seg = segment(img, model, normalize=False, channel_axis=0, diameter=diameter)
                secs.append(time.perf_counter() - t)
                preds.append(seg.labels)
                diams.append(seg.diameter)
                tiles.append(seg.tile_size)
                if mode == "auto":
                    with torch.inference_mode():
                        first.append(choose_scale(model, img, model.cfg.tile_size, "auto", torch.device("cpu")))
            row = {"scale": scale, "diameter": mode, "seconds_per_image": round(float(np.mean(secs)), 3)}
            for src in sources:
                idx = [i for i, it in enumerate(items) if it.source == src]
                s = evaluate_labels([pairs[i][1] for i in idx], [preds[i] for i in idx], deepcell=False, coco=False,
                                    per_image=False)
                row[src] = round(float(s["f1_mean"]), 4)
            s = evaluate_labels([g for _, g in pairs], preds, deepcell=False, coco=False, per_image=False)
            row["all"] = round(float(s["f1_mean"]), 4)
            if mode == "auto":
                true = [median_diameter(g) for _, g in pairs]
                ratios = [d / t for d, t in zip(diams, true, strict=True) if d and t]
                row["auto/true diameter (median)"] = round(float(np.median(ratios)), 3) if ratios else None
                row["auto diameter error (mean |log|)"] = round(float(np.mean(np.abs(np.log(ratios)))), 3)
                sized = [abs(np.log(d / t)) for (_, d), t in zip(first, true, strict=True) if d and t]
                row["size model error (mean |log|)"] = round(float(np.mean(sized)), 3)
                found = [median_diameter(lab) for lab in preds]
                row["cells' diameter error (mean |log|)"] = round(float(np.mean(
                    [abs(np.log(d / t)) for d, t in zip(found, true, strict=True) if d and t])), 3)
                row["second passes"] = sum(seg_tile != tile for seg_tile, (tile, _) in zip(tiles, first, strict=True))
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"model": args.model, "split": args.split, "images": len(items), "sources": sources, "rows": rows,
           "command": "python scripts/scale_study.py " + " ".join(__import__("sys").argv[1:])}
    Path(args.json).write_text(json.dumps(out, indent=1))
    if args.markdown:
        head = ["scale", "diameter", *sources, "all", "s/img", "auto/true", "size model error",
                "cells' diameter error", "second passes"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            lines.append("| " + " | ".join([f"{r['scale']}x", r["diameter"], *[f"{r[s]:.3f}" for s in sources],
                                             f"{r['all']:.3f}", f"{r['seconds_per_image']:.2f}",
                                             *[str(r.get(k, "-")) for k in ("auto/true diameter (median)",
                                                                           "size model error (mean |log|)",
                                                                           "cells' diameter error (mean |log|)",
                                                                           "second passes")]]) + " |")
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
