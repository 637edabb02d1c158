"""Generalist vs specialist at a reduced budget: fine-tune the default model on each source and on all.

    python scripts/specialist_study.py --data prepared --out benchmarks/specialists
    PYTHONPATH=/tmp/cp3 python scripts/specialist_study.py --tool cellpose --data prepared \
        --out benchmarks/specialists_cellpose

With ``--tool cellpose`` the arms fine-tune the Cellpose budget generalist (``--start``, default
``runs/cellpose_budget/models/cellpose_generalist``) with ``scripts/train_cellpose_baseline.py --init``
for ``--cellpose-steps`` SGD steps of batch 8 (45 by default: ~6 min on the 2-core CPU, what CellSAM's
250 steps take) on at most ``--cellpose-tiles`` tiles, and evaluate it with ``--baseline cellpose:MODEL``.

For every arm (``all`` and one per training source) runs
``cellsam train --config configs/finetune_specialist.yaml --set output=runs/finetune/ARM [--set sources=[ARM]]``
(skipped when ``runs/finetune/ARM/model.safetensors`` exists), evaluates the model on the validation
split (``cellsam evaluate --json``; kept when the model was not retrained) and writes ``OUT.md`` /
``OUT.json``: over all images and per validation source, F1@0.5 (mean over images), DeepCell F1
(IoU > 0.6) and Cellpose AP50 of every arm, next to the starting model.
Every arm gets the same extra steps, so the comparison is specialisation at equal budget, not a
specialist trained from scratch as in the paper (that needs a full recipe per source).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METRICS = (("F1@.5 mean", lambda s: s["f1_mean"]), ("DeepCell F1", lambda s: s["deepcell"]["f1"]),
           ("AP50", lambda s: s["ap50"]))


def _run(cmd: list[str]) -> float:
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def table(reports: dict[str, dict], sources: list[str], method: str = "cellsam") -> str:
    """Markdown: one row per arm; the three metrics over all images, then per validation source."""
    groups = ["ALL", *sources]
    head = "| model | " + " | ".join(f"{g} {name}" for g in groups for name, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (1 + len(groups) * len(METRICS))]
    for arm, rep in reports.items():
        by = {"ALL": rep["methods"][method]["overall"], **rep["methods"][method]["by_source"]}
        cells = [f"{fn(by[g]):.3f}" if g in by else "-" for g in groups for _, fn in METRICS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tiles_note(config: str) -> str:
    """'N joint steps of batch B' from the fine-tuning config."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text())
    return f"{cfg['max_steps']} {cfg['stage']} steps of batch {cfg['batch_size']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/specialists"))
    ap.add_argument("--runs", type=Path, default=Path("runs/finetune"))
    ap.add_argument("--config", default="configs/finetune_specialist.yaml")
    ap.add_argument("--start", default=None, help="the model every arm starts from (overrides the config's init; "
                    "default: 'default', or the Cellpose budget generalist with --tool cellpose)")
    ap.add_argument("--tool", choices=("cellsam", "cellpose"), default="cellsam")
    ap.add_argument("--cellpose-steps", type=int, default=45)
    ap.add_argument("--cellpose-tiles", type=int, default=200)
    args = ap.parse_args()
    if args.tool == "cellpose":
        args.start = args.start or "runs/cellpose_budget/models/cellpose_generalist"
        if args.runs == Path("runs/finetune"):
            args.runs = Path("runs/finetune_cellpose")
    args.start = args.start or "default"
    if args.tool == "cellsam" and args.start == "default":
        from cellsam.registry import get_weights

        args.start = get_weights("default").name  # name the model the study starts from
    tiles = json.loads((Path(args.data) / "train" / "tiles.json").read_text())
    sources = sorted({t.get("source", "?") for t in tiles})
    cellsam = [sys.executable, "-m", "cellsam.cli"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict] = {}
    record: dict[str, dict] = {}
    old_json = args.out.with_suffix(".json")
    previous = json.loads(old_json.read_text())["arms"] if old_json.is_file() else {}
    method = args.tool
    for arm in ["start", "all", *sources]:
        if arm == "start":
            model = args.start
        elif args.tool == "cellsam":
            model = str(args.runs / arm / "model.safetensors")
        else:
            model = str(args.runs / arm / "models" / arm)
        train_s: float | None = None
        if arm != "start" and not Path(model).is_file():
            if args.tool == "cellsam":
                cmd = [*cellsam, "train", "--config", args.config, "--set", f"data={args.data}",
                       "--set", f"init={args.start}", "--set", f"output={args.runs / arm}"]
                cmd += ["--set", f"sources=[{arm}]"] if arm != "all" else []
            else:
                cmd = [sys.executable, str(Path(__file__).with_name("train_cellpose_baseline.py")), args.data,
                       "-o", str(args.runs / arm), "--name", arm, "--init", args.start,
                       "--epochs", str(args.cellpose_steps), "--nimg-per-epoch", "8",
                       "--max-tiles", str(args.cellpose_tiles)]
                cmd += ["--sources", arm] if arm != "all" else []
            train_s = round(_run(cmd), 1)
        js = args.runs / f"eval_{arm}.json"
        eval_s = None
        if train_s is not None or not js.is_file():  # a new model, or no report yet
            which = (["--model", model] if args.tool == "cellsam"
                     else ["--model", "none", "--baseline", f"cellpose:{model}"])
            eval_s = round(_run([*cellsam, "evaluate", "--data", args.data, "--split", "val", *which,
                                 "--json", str(js), "--no-progress"]), 1)
        reports[arm] = json.loads(js.read_text())
        before = previous.get(arm, {})  # timings of the run that made a kept model / report
        record[arm] = {"model": model, "train_seconds": train_s if train_s is not None else before.get("train_seconds"),
                       "eval_seconds": eval_s if eval_s is not None else before.get("eval_seconds"),
                       "by_source": {src: {name: fn(s) for name, fn in METRICS}
                                     for src, s in reports[arm]["methods"][method]["by_source"].items()}}
    val_sources = sorted({s for r in reports.values() for s in r["methods"][method]["by_source"]})
    md = table(reports, val_sources, method)
    recipe = (args.config if args.tool == "cellsam" else
              f"scripts/train_cellpose_baseline.py --init START --epochs {args.cellpose_steps} --nimg-per-epoch 8 "
              f"--max-tiles {args.cellpose_tiles}")
    steps = (tiles_note(args.config) if args.tool == "cellsam" else
             f"{args.cellpose_steps} SGD steps of batch 8, lr 0.1 after a 10-step warm-up, on at most "
             f"{args.cellpose_tiles} random tiles of the arm's sources")
    args.out.with_suffix(".json").write_text(json.dumps({"tool": args.tool, "config": recipe, "arms": record},
                                                        indent=1) + "\n")
    tool = "CellSAM" if args.tool == "cellsam" else "Cellpose 3"
    header = (f"# Generalist vs specialist at a reduced budget ({tool})\n\n"
              f"Every arm: `{recipe}` from `{args.start}` ({steps}), on one training source or on all (`all`); "
              "`start` is the model before fine-tuning. Validation split of "
              f"`{args.data}`, the model's stored inference defaults. Made by `python scripts/specialist_study.py "
              f"--tool {args.tool} --data {args.data} --out {args.out}`; training and evaluation times in "
              f"`{args.out.name}.json`.\n\n")
    args.out.with_suffix(".md").write_text(header + md + "\n")
    print(md)


if __name__ == "__main__":
    main()
