"""Ship a trained run as the package's default model (a maintainer script, not part of the package).

    python scripts/ship_default.py runs/cpu_v3/stage2/model.safetensors --name cellsam_cpu_v3 --version v3 \
        --recipe configs/cpu_v3.yaml --data prepared --sweep-images 16 --tile-sizes 256 320 --single-mask

1. Picks the default box / IoU thresholds on about ``--sweep-images`` validation images, each source's
   share of them but at least two of every source (:func:`sweep_subset`), by the mean over sources of the
   reference F1 at IoU 0.5 (``f1_mean``: each source counts once, however many images it has; until
   2026-12-04 the subset was every 4th image of the split, all of them DSB), then tries one box-refinement
   round at the best pair, then the inference tile size (``--tile-sizes``: input pixels per model tile,
   i.e. the scale) at box thresholds 0.3 and the best; the grid is printed and saved.
2. Writes ``cellsam/pretrained/<name>.safetensors`` + ``.json`` with those thresholds in
   ``cfg.inference`` (keeping the model's ``cell_diameter``; ``--local-decoding`` and
   ``--box-threshold-rel`` store local decoding and the relative box threshold, used in the sweep too)
   and the training data and licences in the metadata (the variant: the training run's model).
3. Prints the sha256 to put in ``cellsam/registry.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cellsam.eval.harness import EvalItem, load_prepared
from cellsam.eval.metrics import evaluate_labels
from cellsam.inference.segment import Segmentation, segment
from cellsam.models.cellsam import CellSAM
from cellsam.weights import load_model, save_model, sha256_file

TRAINING_DATA = {
    "dsb2018": "2018 Data Science Bowl stage1_train (BBBC038), community-fixed masks; CC0",
    "deepcell1": "DeepCell 1.0 training data (Van Valen et al. 2016); research use, cite the paper",
    "monuseg": "MoNuSeg 2018 training images (Kumar et al. 2017); CC BY-NC-SA 4.0 (non-commercial)",
}


MIN_PER_SOURCE = 2


def sweep_subset(items: list[EvalItem], n: int) -> list[EvalItem]:
    """About ``n`` of ``items``: each source its share of ``n`` (at least :data:`MIN_PER_SOURCE`, at most
    all of its images), evenly spaced in its own list."""
    by: dict[str, list[EvalItem]] = defaultdict(list)
    for it in items:
        by[it.source].append(it)
    out: list[EvalItem] = []
    for _, its in sorted(by.items()):
        k = min(len(its), max(MIN_PER_SOURCE, round(n * len(its) / len(items))))
        out += [its[int(j * len(its) / k)] for j in range(k)]
    return out


def sweep(model: CellSAM, loaded: list[tuple[np.ndarray, np.ndarray]], sources: list[str], boxes: list[float],
          ious: list[float], refine: int = 0, tiles: Sequence[int | None] = (None,)) -> list[dict]:
    model.cfg = model.cfg.replace(inference=dataclasses.replace(model.cfg.inference, refine_boxes=refine))
    rows = []
    for b, i, t in itertools.product(boxes, ious, tiles):
        preds = [seg.labels for img, _ in loaded
                 if isinstance(seg := segment(img, model, normalize=False, channel_axis=0, box_threshold=b,
                                              iou_threshold=i, tile_size=t), Segmentation)]
        by_source = {}
        for src in sorted(set(sources)):
            k = [j for j, s in enumerate(sources) if s == src]
            by_source[src] = evaluate_labels([loaded[j][1] for j in k], [preds[j] for j in k], deepcell=False,
                                             coco=False, per_image=False)["f1_mean"]
        n_pred = sum(int(p.max()) for p in preds)  # labels are 1..N
        rows.append({"box_threshold": b, "iou_threshold": i, "refine_boxes": refine,
                     "tile_size": t or model.cfg.tile_size, "f1_mean": float(np.mean(list(by_source.values()))),
                     "by_source": by_source, "n_pred": n_pred,
                     "n_true": sum(len(np.unique(g[g > 0])) for _, g in loaded)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--name", default="cellsam_cpu_v2")
    ap.add_argument("--version", default="v2")
    ap.add_argument("--recipe", default="configs/cpu_v2.yaml", help="the training config, named in the metadata")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--sweep-images", type=int, default=16)
    ap.add_argument("--boxes", type=float, nargs="+", default=[0.15, 0.2, 0.25, 0.3, 0.4])
    ap.add_argument("--ious", type=float, nargs="+", default=[0.0, 0.3])
    ap.add_argument("--tile-sizes", type=int, nargs="+", default=[320, 384, 448])
    ap.add_argument("--out", default="cellsam/pretrained")
    ap.add_argument("--single-mask", action="store_true",
                    help="the decoder was trained on its single-mask output only (v3): store inference.multimask "
                         "False so that click prompts never return the untrained multimask outputs")
    ap.add_argument("--local-decoding", action="store_true",
                    help="store inference.local_decoding (measure it first: scripts/local_decoding_ab.py)")
    ap.add_argument("--box-threshold-rel", type=float, default=0.0,
                    help="store inference.box_threshold_rel, used in the sweep too (measure it first: "
                         "scripts/score_study.py on val and on the own test split)")
    args = ap.parse_args()

    model = load_model(args.model).eval()
    # kept from training: the size model's reference diameter; set here: local decoding (swept with it)
    model.cfg = model.cfg.replace(inference=dataclasses.replace(
        model.cfg.inference, local_decoding=args.local_decoding, box_threshold_rel=args.box_threshold_rel))
    subset = sweep_subset(load_prepared(args.data, "val"), args.sweep_images)
    loaded = [it.load() for it in subset]
    sources = [it.source for it in subset]
    rows = sweep(model, loaded, sources, args.boxes, args.ious)
    best = max(rows, key=lambda r: (r["f1_mean"], -abs(r["box_threshold"] - 0.4)))
    # one refinement round, tried at the best thresholds only (it doubles the decoder's work)
    rows += sweep(model, loaded, sources, [best["box_threshold"]], [best["iou_threshold"]], refine=1)
    best = max(rows, key=lambda r: (r["f1_mean"], -r["refine_boxes"], -abs(r["box_threshold"] - 0.4)))
    # the inference scale: tiles of T input pixels resized to the model input (T > input: cells shrink); only
    # for a model without a size reference: a given tile size switches diameter="auto" off, so those rows
    # would not compare with the ones above (v5's grid, 2026-12-03, has such rows; its choice was an auto one)
    if not model.cfg.inference.cell_diameter:
        rows += sweep(model, loaded, sources, [0.3, best["box_threshold"]] if best["box_threshold"] != 0.3 else [0.3],
                      [best["iou_threshold"]], refine=best["refine_boxes"], tiles=args.tile_sizes)
    best = max(rows, key=lambda r: (r["f1_mean"], -r["refine_boxes"], -abs(r["box_threshold"] - 0.4)))
    print("chosen:", best)
    model.cfg = model.cfg.replace(tile_size=int(best["tile_size"]), inference=dataclasses.replace(
        model.cfg.inference, box_threshold=best["box_threshold"], iou_threshold=best["iou_threshold"],
        mask_threshold=0.5, refine_boxes=best["refine_boxes"], multimask=not args.single_mask))
    meta_src = json.loads(Path(args.model).with_suffix(".json").read_text())
    meta = {
        "variant": (meta_src.get("training") or {}).get("model") or meta_src.get("variant", "vit_cpu"),
        "description": f"CellSAM CPU model trained from scratch with `cellsam train --config {args.recipe}`",
        "training_data": TRAINING_DATA,
        "license": "weights: Apache-2.0 code licence; trained on MoNuSeg (CC BY-NC-SA 4.0): non-commercial use",
        "threshold_sweep": {"images": [it.name for it in subset], "grid": rows, "chosen": best},
        "training": meta_src.get("training"),
        "steps": meta_src.get("steps"),
    }
    out = save_model(model, Path(args.out) / args.name, version=args.version, metadata=meta)
    print("written", out, "sha256", sha256_file(out), "size MB %.1f" % (out.stat().st_size / 1e6))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
