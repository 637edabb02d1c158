"""Check that `cellsam segment` on raw validation files scores like the in-memory harness (issue 3).

    python scripts/cli_vs_harness.py --data prepared --model default --out /tmp/cli_check

Runs the CLI on the raw files of every single-file val image (pairs layout: DSB, MoNuSeg), writes the
prepared ground truth beside as NAME_masks.npy, scores with `cellsam evaluate --pred/--gt`, and
compares with the harness (segment on the prepared arrays) on the same images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from cellsam.eval.harness import cellsam_method, load_prepared, predict_all, score_predictions
from cellsam.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", default="/tmp/cli_check")
    args = ap.parse_args()
    root, out = Path(args.data), Path(args.out)
    entries = json.loads((root / "val" / "images.json").read_text())
    singles = [e for e in entries if set(e["files"]) == {"image", "labels"}]
    gt_dir, pred_dir = out / "gt", out / "pred"
    gt_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for e in singles:
        name = Path(e["files"]["image"]).name.rsplit(".", 1)[0]  # NAME_img: the CLI writes NAME_img_labels.tif
        np.save(gt_dir / f"{name}_masks.npy", np.load(root / e["labels_npy"]))
        names.append(name)
    cmd = [sys.executable, "-m", "cellsam.cli", "segment", *[e["files"]["image"] for e in singles],
           "-o", str(pred_dir), "--model", args.model]
    subprocess.run(cmd, check=True)
    rep = out / "cli.json"
    subprocess.run([sys.executable, "-m", "cellsam.cli", "evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir),
                    "--json", str(rep)], check=True)
    cli_f1 = json.loads(rep.read_text())["methods"]["pred"]["overall"]["f1_mean"]

    wanted = {e["image_id"] for e in singles}
    items = [it for it in load_prepared(root, "val") if any(w in it.name for w in wanted)]
    model = load_model(args.model)
    gts, preds = [], []
    for _, gt, pred in predict_all(items, cellsam_method(model)):
        gts.append(gt)
        preds.append(pred)
    mem_f1 = score_predictions(gts, preds)["f1_mean"]
    print(json.dumps({"images": len(singles), "harness_items": len(items), "cli_f1_mean": cli_f1,
                      "harness_f1_mean": mem_f1, "difference": abs(cli_f1 - mem_f1)}, indent=1))


if __name__ == "__main__":
    main()
