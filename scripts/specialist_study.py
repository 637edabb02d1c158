"""Generalist vs specialist at a reduced budget: fine-tune the default model on each source and on all.

    python scripts/specialist_study.py --data prepared --out benchmarks/specialists

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


def table(reports: dict[str, dict], sources: list[str]) -> str:
    """Markdown: one row per arm; the three metrics over all images, then per validation source."""
    groups = ["ALL", *sources]
    head = "| model | " + " | ".join(f"{g} {name}" for g in groups for name, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (1 + len(groups) * len(METRICS))]
    for arm, rep in reports.items():
        by = {"ALL": rep["methods"]["cellsam"]["overall"], **rep["methods"]["cellsam"]["by_source"]}
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
    ap.add_argument("--start", default="default", help="the model every arm starts from (overrides the config's init)")
    args = ap.parse_args()
    tiles = json.loads((Path(args.data) / "train" / "tiles.json").read_text())
    sources = sorted({t.get("source", "?") for t in tiles})
    cellsam = [sys.executable, "-m", "cellsam.cli"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict] = {}
    record: dict[str, dict] = {}
    old_json = args.out.with_suffix(".json")
    previous = json.loads(old_json.read_text())["arms"] if old_json.is_file() else {}
    for arm in ["start", "all", *sources]:
        model = args.start if arm == "start" else str(args.runs / arm / "model.safetensors")
        train_s: float | None = None
        if arm != "start" and not Path(model).is_file():
            cmd = [*cellsam, "train", "--config", args.config, "--set", f"data={args.data}",
                   "--set", f"init={args.start}", "--set", f"output={args.runs / arm}"]
            if arm != "all":
                cmd += ["--set", f"sources=[{arm}]"]
            train_s = round(_run(cmd), 1)
        js = args.runs / f"eval_{arm}.json"
        eval_s = None
        if train_s is not None or not js.is_file():  # a new model, or no report yet
            eval_s = round(_run([*cellsam, "evaluate", "--data", args.data, "--split", "val", "--model", model,
                                 "--json", str(js), "--no-progress"]), 1)
        reports[arm] = json.loads(js.read_text())
        before = previous.get(arm, {})  # timings of the run that made a kept model / report
        record[arm] = {"model": model, "train_seconds": train_s if train_s is not None else before.get("train_seconds"),
                       "eval_seconds": eval_s if eval_s is not None else before.get("eval_seconds"),
                       "by_source": {src: {name: fn(s) for name, fn in METRICS}
                                     for src, s in reports[arm]["methods"]["cellsam"]["by_source"].items()}}
    val_sources = sorted({s for r in reports.values() for s in r["methods"]["cellsam"]["by_source"]})
    md = table(reports, val_sources)
    args.out.with_suffix(".json").write_text(json.dumps({"config": args.config, "arms": record}, indent=1) + "\n")
    header = ("# Generalist vs specialist at a reduced budget\n\n"
              f"Every arm: `{args.config}` from `{args.start}` ({tiles_note(args.config)}), on one training source "
              "or on all (`all`); `start` is the model before fine-tuning. Validation split of "
              f"`{args.data}`, the model's stored inference defaults. Made by `python scripts/specialist_study.py "
              f"--data {args.data} --out {args.out}`; training and evaluation times in `{args.out.name}.json`.\n\n")
    args.out.with_suffix(".md").write_text(header + md + "\n")
    print(md)


if __name__ == "__main__":
    main()
