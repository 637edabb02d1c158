"""How well CellFinder's boxes fit the cells, per source: the numbers behind README "Making DETR converge".

    python scripts/detector_oracle.py runs/cpu_default/stage2/model.safetensors --native
    python scripts/detector_oracle.py default                       # the inference scale (384 -> 256)

On ``--n`` random tiles of a prepared split (seeded), a centre crop (256 px with ``--native``, else 384 px
resized to the model's 256 as the shipped defaults do) goes through the encoder and CellFinder. Per source:
ground-truth cells; queries scoring above ``--box-threshold``; those matched one-to-one (Hungarian) at box
IoU >= 0.5 ("tp"); the **oracle**, cells for which ANY query's box reaches IoU >= 0.5 whatever its score
(does box regression work at all?); and for the matched pairs, mean and spread of true and predicted box
widths (pixels of the 256 input) and their correlation (has the detector learned size?).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import cellsam
from cellsam.ops.boxes import box_cxcywh_to_xyxy, box_iou
from cellsam.train.targets import labels_to_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="weights name or checkpoint")
    ap.add_argument("--split-dir", type=Path, default=Path("prepared/val"), help="a prepared split folder")
    ap.add_argument("--native", action="store_true", help="256 px crops at native scale")
    ap.add_argument("--n", type=int, default=40, help="tiles drawn (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--box-threshold", type=float, default=0.4)
    args = ap.parse_args()
    model = cellsam.load_model(args.model).eval()
    side = model.img_size
    images = np.load(args.split_dir / "images.npy", mmap_mode="r")
    labels = np.load(args.split_dir / "labels.npy", mmap_mode="r")
    tiles = json.loads((args.split_dir / "tiles.json").read_text())
    crop = side if args.native else side * 3 // 2
    a = (images.shape[-1] - crop) // 2
    stats: dict[str, dict] = {}
    for i in np.random.default_rng(args.seed).choice(len(tiles), min(args.n, len(tiles)), replace=False):
        image = torch.from_numpy(np.array(images[i, :, a : a + crop, a : a + crop]))
        lab = torch.from_numpy(np.array(labels[i, 0, a : a + crop, a : a + crop]).astype(np.int64))
        x = F.interpolate(image[None], size=side, mode="bilinear", align_corners=False)
        lab = F.interpolate(lab[None, None].float(), size=side, mode="nearest")[0, 0].long()
        gt = labels_to_targets(lab)["boxes"]
        with torch.no_grad():
            xp = model.preprocess(x)
            out = model.detect(model.encode(xp), xp)
        scores, boxes = out["pred_logits"][0].sigmoid().max(-1).values, out["pred_boxes"][0]
        empty = {"gt": 0, "pred": 0, "tp": 0, "oracle": 0, "gw": [], "pw": []}
        s = stats.setdefault(tiles[i].get("source", "?"), empty)
        s["gt"] += len(gt)
        if not len(gt):
            continue
        iou = box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt))  # (Q, M)
        s["oracle"] += int((iou.max(0).values >= 0.5).sum())
        keep = scores > args.box_threshold
        s["pred"] += int(keep.sum())
        if keep.any():
            r, c = linear_sum_assignment(-iou[keep].numpy())
            s["tp"] += int((iou[keep][r, c] >= 0.5).sum())
            s["gw"] += (gt[c, 2] * side).tolist()
            s["pw"] += (boxes[keep][r, 2] * side).tolist()
    for src, s in stats.items():
        gw, pw = np.array(s["gw"]), np.array(s["pw"])
        corr = np.corrcoef(gw, pw)[0, 1] if len(gw) > 2 else float("nan")
        widths = (f"true width {gw.mean():.1f} sd {gw.std():.1f} px, predicted {pw.mean():.1f} sd {pw.std():.1f}, "
                  f"corr {corr:.2f}") if len(gw) else "no matched pairs"
        counts = f"cells {s['gt']:4d} scored {s['pred']:4d} tp@.5 {s['tp']:4d} oracle@.5 {s['oracle']:4d}"
        print(f"{src:10s} {counts}; {widths}")


if __name__ == "__main__":
    main()
