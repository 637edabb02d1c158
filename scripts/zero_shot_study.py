"""Leave-one-source-out (zero-shot) at a reduced budget, for CellSAM and Cellpose 3.

    PYTHONPATH=/tmp/cp3 python scripts/zero_shot_study.py --source monuseg --data prepared \\
        --out benchmarks/zero_shot

Our stand-in for the paper's LIVECell zero-shot test (Fig. 2d): per tool, two models trained from
random weights at the same budget, one on every training source (``all``) and one without ``--source``
(``no_SOURCE``); both are scored on ``--source``'s images of the ``--splits`` (val and test: images
neither model trained on). CellSAM: the single-stage config ``--cellsam-config`` (v1's stage 1 by
default), also scored with ground-truth boxes as prompts (``--prompt-study``), which isolates the mask
decoder from the detector. Cellpose: ``scripts/train_cellpose_baseline.py`` with ``--cellpose-steps``
SGD steps of batch 8 (epochs of ``--cellpose-nimg-per-epoch`` images: the warm-up is 10 epochs) on at
most ``--cellpose-tiles`` random tiles; ``--cellpose-all MODEL`` takes an existing all-sources model
trained by that same command (e.g. the budget baseline) instead of training it again. A model whose file
exists is kept (``runs/zero_shot/ARM``), so a run can be resumed or an identical earlier run reused; the
training time of a Cellpose model trained elsewhere is read from its record (``NAME.json`` beside
``models/``).

Writes ``OUT.md`` / ``OUT.json``: per arm, F1@0.5 and Cellpose AP50 (means over images), DeepCell F1
and the number of images, pooled over the splits and per split.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cellsam.eval.report import command_line


def _run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def summarise(reports: list[dict], method: str) -> dict[str, float]:
    """Means over the images of several evaluation reports (one per split) for one method."""
    per = [im for r in reports for im in r["methods"][method]["per_image"]]
    tp = sum(im["deepcell"]["correct"] for im in per)
    n_true = sum(im["deepcell"]["n_true"] for im in per)
    n_pred = sum(im["deepcell"]["n_pred"] for im in per)
    return {"images": len(per), "f1_50_mean": float(np.mean([im["f1"]["0.50"] for im in per])),
            "ap50_mean": float(np.mean([im["ap"]["0.50"] for im in per])),
            "deepcell_f1": 2 * tp / (n_true + n_pred) if n_true + n_pred else 1.0}


def cellpose_train_seconds(model: Path) -> float | None:
    """Wall seconds of a Cellpose model's training from its record ``OUT/NAME.json`` (``OUT/models/NAME``)."""
    rec = model.parent.parent / f"{model.name}.json"
    return json.loads(rec.read_text()).get("wall_seconds") if rec.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="monuseg", help="the source left out and tested on")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/zero_shot"))
    ap.add_argument("--runs", type=Path, default=Path("runs/zero_shot"))
    ap.add_argument("--cellsam-config", default="configs/zero_shot_cellsam.yaml")
    ap.add_argument("--cellpose-steps", type=int, default=150)
    ap.add_argument("--cellpose-nimg-per-epoch", type=int, default=8,
                    help="images per Cellpose epoch (a multiple of 8); epochs = steps * 8 / this")
    ap.add_argument("--cellpose-tiles", type=int, default=400)
    ap.add_argument("--cellpose-all", type=Path, default=None,
                    help="an existing Cellpose model trained on every source with the same settings: the "
                         "`all` arm (its record MODEL/../../NAME.json gives the training time)")
    ap.add_argument("--tools", nargs="+", choices=("cellsam", "cellpose"), default=["cellsam", "cellpose"])
    ap.add_argument("--cellsam-eval", default="",
                    help="extra `cellsam evaluate` options for the CellSAM arms, e.g. '--box-threshold 0.2' "
                         "(default: the model's stored settings)")
    args = ap.parse_args()
    nimg = args.cellpose_nimg_per_epoch
    if nimg % 8 or (args.cellpose_steps * 8) % nimg:
        ap.error(f"--cellpose-nimg-per-epoch {nimg}: must be a multiple of 8 that divides 8 x --cellpose-steps")
    cli = [sys.executable, "-m", "cellsam.cli"]
    rows: dict[str, dict] = {}
    for tool in args.tools:
        for arm in ("all", f"no_{args.source}"):
            name = f"{tool}_{arm}"
            out = args.runs / name
            model = out / "model.safetensors" if tool == "cellsam" else out / "models" / name
            if tool == "cellpose" and arm == "all" and args.cellpose_all is not None:
                model = args.cellpose_all
            train_s = None
            if not model.is_file():
                if tool == "cellsam":
                    cmd = [*cli, "train", "--config", args.cellsam_config, "--set", f"data={args.data}",
                           "--set", f"output={out}"]
                    cmd += ["--set", f"exclude_sources=[{args.source}]"] if arm != "all" else []
                else:
                    cmd = [sys.executable, str(Path(__file__).with_name("train_cellpose_baseline.py")), args.data,
                           "-o", str(out), "--name", name, "--epochs", str(args.cellpose_steps * 8 // nimg),
                           "--nimg-per-epoch", str(nimg), "--max-tiles", str(args.cellpose_tiles)]
                    cmd += ["--exclude-sources", args.source] if arm != "all" else []
                train_s = round(_run(cmd), 1)
            elif tool == "cellpose":
                train_s = cellpose_train_seconds(model)
            which = (["--model", str(model), "--prompt-study", *args.cellsam_eval.split()] if tool == "cellsam"
                     else ["--model", "none", "--baseline", f"cellpose:{model}"])
            tag = "" if tool == "cellpose" or not args.cellsam_eval else "_" + "".join(
                c for c in args.cellsam_eval if c.isalnum() or c == ".")
            reports = []
            for split in args.splits:
                js = args.runs / f"eval_{name}_{split}{tag}.json"
                if not js.is_file() or js.stat().st_mtime < model.stat().st_mtime:
                    _run([*cli, "evaluate", "--data", args.data, "--split", split, "--sources", args.source,
                          *which, "--json", str(js), "--no-progress"])
                reports.append(json.loads(js.read_text()))
            methods = ["cellsam", "prompt:box"] if tool == "cellsam" else ["cellpose"]
            for m in methods:
                label = f"{name}" if m in ("cellsam", "cellpose") else f"{name} (ground-truth boxes)"
                rows[label] = {"model": str(model), "train_seconds": train_s, "pooled": summarise(reports, m),
                               "by_split": {s: summarise([r], m) for s, r in zip(args.splits, reports, strict=True)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"source": args.source, "splits": args.splits, "cellsam_config": args.cellsam_config,
              "cellsam_eval": args.cellsam_eval,
              "cellpose": {"steps": args.cellpose_steps, "batch": 8, "nimg_per_epoch": nimg,
                           "max_tiles": args.cellpose_tiles,
                           "all_arm": str(args.cellpose_all) if args.cellpose_all else None},
              "arms": rows}
    old = args.out.with_suffix(".json")
    if old.is_file():  # keep the training times of models reused from an earlier run of this script
        for k, v in json.loads(old.read_text()).get("arms", {}).items():
            if k in rows and rows[k]["train_seconds"] is None:
                rows[k]["train_seconds"] = v.get("train_seconds")
    old.write_text(json.dumps(record, indent=1) + "\n")
    head = ("| model | images | F1@.5 mean | AP50 mean | DeepCell F1 | "
            + " | ".join(f"{s} F1@.5" for s in args.splits) + " |")
    lines = [head, "|" + "---|" * (5 + len(args.splits))]
    for label, r in rows.items():
        p = r["pooled"]
        lines.append(f"| {label} | {p['images']} | {p['f1_50_mean']:.3f} | {p['ap50_mean']:.3f} | "
                     f"{p['deepcell_f1']:.3f} | " + " | ".join(f"{r['by_split'][s]['f1_50_mean']:.3f}"
                                                             for s in args.splits) + " |")
    md = "\n".join(lines)
    scored = f"`{args.cellsam_eval}`" if args.cellsam_eval else "its stored settings"
    recipes = {"cellsam": f"CellSAM: `{args.cellsam_config}`, scored with {scored} and with ground-truth boxes "
                          "as prompts",
               "cellpose": f"Cellpose 3: {args.cellpose_steps} SGD steps of batch 8 ({args.cellpose_steps * 8 // nimg} "
                           f"epochs of {nimg} images) from scratch on at most {args.cellpose_tiles} tiles"
                           + (f", the `all` arm being `{args.cellpose_all}`" if args.cellpose_all else "")}
    made_by = command_line(vars(args), "python scripts/zero_shot_study.py", lists_as_one_flag=True)
    header = (f"# Leave one source out: `{args.source}` (zero-shot), at a reduced budget\n\n"
              f"Per tool, a model trained from random weights on every training source (`all`) and one without "
              f"`{args.source}` (`no_{args.source}`), at the same budget; both scored on the `{args.source}` images "
              f"of the {' and '.join(args.splits)} splits of `{args.data}` (seen by neither). "
              + "; ".join(recipes[t] for t in args.tools) + ". A model whose file existed was reused (its training "
              f"time is then the earlier run's, or none). Made by `{made_by}`; times and per-split numbers "
              f"in `{old.name}`.\n\n")
    args.out.with_suffix(".md").write_text(header + md + "\n")
    print(md)


if __name__ == "__main__":
    main()
