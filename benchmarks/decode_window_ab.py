"""Interleaved A/B of the decoder window on real images: ``cellsam.segment`` with ``decode_window`` 0
(whole frames) vs the default, on the validation images the default model's thresholds were swept on.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/decode_window_ab.py --data prepared \\
        --out benchmarks/decode_window_ab.json

Synthetic one-image benches on this 2-core machine drift by more than the effect (10-15%), so each image
is segmented in the order A B B A, then B A A B, after a warm-up; the label images of the two settings
are compared too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cellsam.config import DEFAULT_DECODE_WINDOW
from cellsam.eval.harness import load_prepared
from cellsam.inference.segment import segment
from cellsam.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--images", type=int, default=16, help="val images spread over the sources (as the sweep)")
    ap.add_argument("--window", type=float, default=DEFAULT_DECODE_WINDOW)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/decode_window_ab.json"))
    args = ap.parse_args()
    model = load_model(args.model).eval()
    items = load_prepared(args.data, "val")
    subset = items[:: max(1, len(items) // args.images)][: args.images]
    images = [it.load()[0] for it in subset]

    def run(img: np.ndarray, w: float) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        labels = segment(img, model, normalize=False, channel_axis=0, decode_window=w).labels
        return time.perf_counter() - t0, labels

    for img in images[:2]:  # warm-up
        run(img, 0.0), run(img, args.window)
    times: dict[float, list[float]] = {0.0: [], args.window: []}
    identical = 0
    for rep, order in enumerate([(0.0, args.window, args.window, 0.0), (args.window, 0.0, 0.0, args.window)]):
        for img in images:
            labels = {}
            for w in order:
                t, labels[w] = run(img, w)
                times[w].append(t)
            identical += int(rep == 0 and np.array_equal(labels[0.0], labels[args.window]))
    whole, win = np.array(times[0.0]), np.array(times[args.window])
    record = {
        "model": args.model, "images": [it.name for it in subset], "window": args.window,
        "runs_per_setting": len(whole), "whole_s": float(whole.sum()), "window_s": float(win.sum()),
        "ratio_window_over_whole": float(win.sum() / whole.sum()),
        "identical_label_images": identical, "n_images": len(images),
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "images"}))


if __name__ == "__main__":
    main()
