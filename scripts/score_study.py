"""How well the CellFinder's box scores separate right cells from wrong ones, and what a stricter
per-image threshold would give, from one run of the pipeline at the model's own threshold.

    python scripts/score_study.py MODEL --data prepared --split val [--json out.json]

Each image is segmented with the model's defaults (``diameter="auto"``); each found cell is marked right
when it matches a true cell at IoU >= 0.5 (one-to-one). Printed: per source the score percentiles of
right and wrong cells, then the per-image F1@0.5 mean when only cells above a stricter threshold are kept
(fixed, or relative: ``max(model threshold, r x the image's q-quantile score)``). Dropping cells from a
finished label image approximates a run at that threshold (a dropped cell's pixels are not given to its
neighbours; auto's second pass is not redone). A maintainer script for the detector study (#18).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import numpy as np

from cellsam.eval.harness import load_prepared
from cellsam.eval.matching import label_overlap, match_objects
from cellsam.inference.segment import Segmentation, segment
from cellsam.weights import load_model


def collect(model: str, data: str, split: str) -> list[dict]:
    """Per image: source, true cell count, and per found cell its score and whether it matched."""
    net = load_model(model).eval()
    out = []
    for it in load_prepared(data, split):
        img, gt = it.load()
        seg = segment(img, net, channel_axis=0, normalize=False)
        assert isinstance(seg, Segmentation)
        ov = label_overlap(gt, seg.labels)
        ids = np.asarray(ov.pred_ids)[match_objects(ov, threshold=0.5).pred_index]
        matched = np.zeros(seg.n_cells, bool)
        matched[ids[ids > 0] - 1] = True
        present = np.isin(np.arange(1, seg.n_cells + 1), ov.pred_ids)  # label k+1 has scores[k]
        out.append({"source": it.source, "n_true": int(ov.gt_ids.size), "scores": seg.scores[present].tolist(),
                    "matched": matched[present].tolist()})
    return out


def f1_kept(rows: list[dict], rule: Callable[[np.ndarray], float]) -> dict[str, float]:
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        s, m = np.array(r["scores"]), np.array(r["matched"], bool)
        keep = s >= (rule(s) if len(s) else 0.0)
        n = int(keep.sum())
        f1 = 2 * int((m & keep).sum()) / (r["n_true"] + n) if r["n_true"] + n else 1.0
        by[r["source"]].append(f1)
        by["ALL"].append(f1)
    return {k: float(np.mean(v)) for k, v in sorted(by.items())}


def fixed(scores: np.ndarray, *, t: float) -> float:
    return t


def relative(scores: np.ndarray, *, floor: float, r: float, q: float) -> float:
    return max(floor, r * float(np.quantile(scores, q)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--split", default="val")
    ap.add_argument("--json")
    a = ap.parse_args()
    base = float(load_model(a.model).cfg.inference.box_threshold)
    rows = collect(a.model, a.data, a.split)
    for src in sorted({r["source"] for r in rows}):
        s = np.concatenate([r["scores"] for r in rows if r["source"] == src])
        m = np.concatenate([r["matched"] for r in rows if r["source"] == src]).astype(bool)
        print(f"{src:10s} right {int(m.sum()):5d} score p10/p25/p50 {np.percentile(s[m], [10, 25, 50]).round(2)}  "
              f"wrong {int((~m).sum()):5d} p50/p75/p90 {np.percentile(s[~m], [50, 75, 90]).round(2)}")
    rules: dict[str, Callable[[np.ndarray], float]] = {
        f"fixed {t:g}": partial(fixed, t=t) for t in (base, 0.32, 0.35, 0.4)}
    for q in (0.5, 0.9):
        for r in (0.5, 0.6):
            rules[f"rel {r:g} x q{q:g}"] = partial(relative, floor=base, r=r, q=q)
    table = {name: f1_kept(rows, rule) for name, rule in rules.items()}
    cols = list(next(iter(table.values())))
    print(f"{'kept':16s}" + "".join(f"{c:>11s}" for c in cols))
    for name, row in table.items():
        print(f"{name:16s}" + "".join(f"{row[c]:11.3f}" for c in cols))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "split": a.split, "f1_mean": table}, f, indent=1)


if __name__ == "__main__":
    main()
