"""Detector-only scores: box precision / recall / F1 at IoU >= 0.5 per source, on validation crops.

    python scripts/box_recall.py MODEL [MODEL ...] --data prepared --split val --crop 256 --max-tiles 150 \
        [--box-threshold T] [--ckpt-variant conv_cpu] [--json out.json]

Each prepared tile's centre crop (the model's input side at native scale, as in training) goes through
the model's encoder and CellFinder only (``encode`` -> ``detect`` -> ``postprocess_detections`` at the
model's stored box threshold unless ``--box-threshold``); boxes are matched one-to-one to the crop's
ground-truth boxes by maximum IoU (Hungarian), a match counts at IoU >= 0.5. Cells cut by the crop
border count as they appear in it (their visible box). A maintainer script for the detector study
(benchmarks/detector_study.md), not part of the package.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from cellsam.ops.boxes import box_iou
from cellsam.train.dataset import PreparedTiles
from cellsam.weights import load_model


def load(path: str, variant: str) -> torch.nn.Module:
    """A model file, or a Lightning training checkpoint (``.ckpt``) of the architecture ``variant``."""
    if not path.endswith(".ckpt"):
        return load_model(path)
    from cellsam.models.build import build_model

    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    net = build_model(variant)
    net.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}, strict=True)
    return net


def score(model_path: str, ds: PreparedTiles, box_threshold: float | None, variant: str = "conv_cpu") -> dict:
    net = load(model_path, variant).eval()
    thr = net.cfg.inference.box_threshold if box_threshold is None else box_threshold
    s = net.img_size
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # tp, pred, true
    with torch.inference_mode():
        for k in range(len(ds)):
            image, target = ds[k]
            src = ds.tiles[ds.index[k]].get("source", "?")
            x = image[None]
            if x.shape[-1] != s:
                x = F.interpolate(x, (s, s), mode="bilinear", align_corners=False)
            x = net.preprocess(x)
            det = net.postprocess_detections(net.detect(net.encode(x), x), box_threshold=thr)[0]
            pred = det["boxes"] * (image.shape[-1] / s)
            true = target["boxes_xyxy"]
            tp = 0
            if len(pred) and len(true):
                iou = box_iou(pred, true).numpy()
                r, c = linear_sum_assignment(-iou)
                tp = int((iou[r, c] >= 0.5).sum())
            for key in (src, "ALL"):
                counts[key][0] += tp
                counts[key][1] += len(pred)
                counts[key][2] += len(true)
    out = {}
    for key, (tp, n_pred, n_true) in sorted(counts.items()):
        p, r = tp / max(n_pred, 1), tp / max(n_true, 1)
        out[key] = {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-9), "pred": n_pred, "true": n_true}
    return {"model": model_path, "box_threshold": thr, "by_source": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--split", default="val")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--max-tiles", type=int, default=150)
    ap.add_argument("--box-threshold", type=float)
    ap.add_argument("--ckpt-variant", default="conv_cpu", help="architecture of .ckpt training checkpoints")
    ap.add_argument("--json")
    args = ap.parse_args()
    ds = PreparedTiles(args.data, args.split, crop_size=args.crop, max_items=args.max_tiles)
    results = [score(m, ds, args.box_threshold, args.ckpt_variant) for m in args.models]
    for r in results:
        print(f"{r['model']} (box threshold {r['box_threshold']}):")
        for key, v in r["by_source"].items():
            print(f"  {key:10s} P {v['precision']:.3f}  R {v['recall']:.3f}  F1 {v['f1']:.3f}  "
                  f"({v['pred']} boxes, {v['true']} cells)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"crop": args.crop, "tiles": len(ds), "split": args.split, "results": results}, f, indent=1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
