"""Per-image F1@0.5 of several evaluations, grouped by how elongated the image's cells are.

    python scripts/elongation_study.py EVAL.json [EVAL.json ...] --data prepared --split val \
        [--names v5 stretch] [--json out.json]

Each EVAL.json is written by ``cellsam evaluate --json`` on the same prepared split. An image's
elongation is the median, over its ground-truth cells of at least 20 pixels, of the ratio of the major
to the minor axis of the cell's inertia ellipse (skimage ``regionprops``); 1 is round. Images are
binned by it (< 1.5, 1.5-2, 2-3, >= 3) and by source, and the mean per-image F1@0.5 of each evaluation
is printed per bin. A maintainer script for the elongated-objects study arm (#18), not part of the package.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np
from skimage.measure import regionprops

from cellsam.eval.harness import load_prepared

BINS = ((0.0, 1.5), (1.5, 2.0), (2.0, 3.0), (3.0, np.inf))


def elongation(labels: np.ndarray, min_area: int = 20) -> float:
    """Median major / minor axis ratio of the labelled cells of ``labels`` (H, W); NaN without cells."""
    ratios = [p.axis_major_length / max(p.axis_minor_length, 1.0) for p in regionprops(labels)
              if p.area >= min_area]
    return float(np.median(ratios)) if ratios else float("nan")


def bin_name(value: float) -> str:
    for lo, hi in BINS:
        if lo <= value < hi:
            return f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">={lo:g}"
    return "no cells"


def per_image_f1(path: str) -> dict[str, float]:
    """Image name -> F1@0.5 of one ``cellsam evaluate --json`` file's ``cellsam`` method (else its first)."""
    with open(path) as f:
        methods = json.load(f)["methods"]
    method = methods.get("cellsam") or next(iter(methods.values()))
    return {row["name"]: row["f1"]["0.50"] for row in method["per_image"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evals", nargs="+")
    parser.add_argument("--names", nargs="*")
    parser.add_argument("--data", default="prepared")
    parser.add_argument("--split", default="val")
    parser.add_argument("--json")
    args = parser.parse_args()
    names = args.names or args.evals
    scores = [per_image_f1(p) for p in args.evals]
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    shapes = {}
    for item in load_prepared(args.data, args.split):
        _, labels = item.load()
        shapes[item.name] = elongation(labels)
        for source in (item.source, "ALL"):
            groups[(source, bin_name(shapes[item.name]))].append(item.name)
            groups[(source, "all")].append(item.name)
    print("source     elongation  images  " + "  ".join(f"{n:>10}" for n in names))
    table = []
    for (source, b), members in sorted(groups.items()):
        means = [float(np.mean([s[m] for m in members])) for s in scores]
        table.append({"source": source, "elongation": b, "images": len(members), "f1": dict(zip(names, means))})
        print(f"{source:10} {b:11} {len(members):6}  " + "  ".join(f"{v:10.3f}" for v in means))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arguments": vars(args), "groups": table, "elongation": shapes,
                       "per_image": {n: s for n, s in zip(names, scores)}}, f, indent=1)


if __name__ == "__main__":
    main()
