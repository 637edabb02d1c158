"""A/B of local decoding (the mask decoder's transformer restricted to each box's token window) against
the default windowed decoding, on validation images: F1@0.5 per source and the time per image.

    python scripts/local_decoding_ab.py MODEL --data prepared --images 24 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from cellsam.eval.harness import load_prepared
from cellsam.eval.metrics import evaluate_labels
from cellsam.inference.segment import segment
from cellsam.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--images", type=int, default=24, help="validation images, spread over the sorted list")
    ap.add_argument("--windows", type=float, nargs="+", default=[3.0])
    ap.add_argument("--json")
    args = ap.parse_args()
    model = load_model(args.model).eval()
    items = load_prepared(args.data, "val")
    step = max(1, len(items) // args.images)
    subset = items[::step][: args.images]
    loaded = [it.load() for it in subset]
    rows = []
    for window in args.windows:
        for local in (False, True):
            model.cfg = model.cfg.replace(inference=dataclasses.replace(model.cfg.inference, local_decoding=local))
            preds, times = [], []
            for img, _ in loaded:
                t = time.perf_counter()
                preds.append(segment(img, model, normalize=False, channel_axis=0, decode_window=window).labels)
                times.append(time.perf_counter() - t)
            row = {"window": window, "local": local, "seconds_total": round(sum(times), 3)}
            for src in sorted({it.source for it in subset}):
                idx = [i for i, it in enumerate(subset) if it.source == src]
                s = evaluate_labels([loaded[i][1] for i in idx], [preds[i] for i in idx], deepcell=False,
                                    coco=False, per_image=False)
                row[f"f1_mean/{src}"] = round(float(s["f1_mean"]), 4)
            s = evaluate_labels([g for _, g in loaded], preds, deepcell=False, coco=False, per_image=False)
            row["f1_mean"] = round(float(s["f1_mean"]), 4)
            row["n_pred"] = int(s["n_pred"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "images": [it.name for it in subset], "rows": rows}, f, indent=1)
    _ = np


if __name__ == "__main__":
    main()
