"""``cellsam benchmark``: our model, Cellpose and the classical floor on one split, into ``accuracy.md``.

Runs the evaluation of ``cellsam evaluate --data DATA --split SPLIT`` (:func:`cellsam.eval.runner.evaluate_data`,
recorded in the report as that command) once with the model (``--model``, default the shipped
one), its prompt study (masks from ground-truth boxes and points; ``--no-prompt-study`` to skip), the
Otsu + watershed floor (``--no-otsu`` to skip) and, with ``--cellpose MODEL_FILE``, a Cellpose model
(e.g. the baseline from ``scripts/train_cellpose_baseline.py``), all on the same images. Writes the
report JSON (``--json``), plots (``--plots``) and a markdown page (``--out``): every metric per method,
per source and per data type, with the commands and versions used.

``--merge A.json B.json ...`` writes the page from reports of separate ``cellsam evaluate`` runs on the
same images instead (e.g. a baseline evaluated once and the model re-evaluated after retraining).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cellsam.cli import help_text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``benchmark`` on the ``cellsam`` command."""
    p = subparsers.add_parser(
        "benchmark", help="accuracy of our model vs Cellpose vs Otsu on a split, written to accuracy.md",
        description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=Path("prepared"), help="prepared dataset or annotated folder")
    p.add_argument("--split", default="val")
    p.add_argument("--model", default="default", help="weights name or checkpoint ('none': baselines only)")
    p.add_argument("--cellpose", metavar="MODEL_FILE", help="also evaluate this Cellpose model")
    p.add_argument("--no-otsu", action="store_true", help="leave out the Otsu + watershed floor")
    p.add_argument("--no-prompt-study", action="store_true", help="leave out the ground-truth prompt study")
    p.add_argument("--sources", nargs="+", default=(), metavar="SOURCE", help="only these sources' images")
    p.add_argument("--out", type=Path, default=Path("benchmarks/accuracy.md"), help="markdown page to write")
    p.add_argument("--json", type=Path, help="report JSON (default: OUT's folder/accuracy_SPLIT.json)")
    p.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    p.add_argument("--title", help="page title (default: names the split and its size)")
    p.add_argument("--notes", type=Path, help="a markdown file put between the title and the tables")
    p.add_argument("--merge", nargs="+", type=Path, metavar="REPORT",
                   help="write the page from these evaluate --json reports (no evaluation)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def evaluate_argv(args: argparse.Namespace, json_path: Path) -> list[str]:
    """The ``cellsam evaluate`` arguments this benchmark runs."""
    argv = ["evaluate", "--data", str(args.data), "--split", args.split, "--model", args.model,
            "--json", str(json_path), "--device", args.device, "--precision", args.precision]
    if args.model != "none" and not args.no_prompt_study:
        argv.append("--prompt-study")
    if not args.no_otsu:
        argv += ["--baseline", "otsu"]
    if args.cellpose:
        argv += ["--baseline", f"cellpose:{args.cellpose}"]
    if args.sources:
        argv += ["--sources", *args.sources]
    if args.plots is not None:
        argv += ["--plots", str(args.plots)]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def benchmark_command(args: argparse.Namespace) -> str:
    """This run's ``cellsam benchmark`` command line (only the options of the mode used)."""
    from cellsam.eval.report import command_line

    keys = (["merge", "out", "title", "notes"] if args.merge else
            ["data", "split", "model", "cellpose", "no_otsu", "no_prompt_study", "sources", "out", "json", "plots",
             "title", "notes", "device", "precision", "no_progress"])
    return command_line({k: getattr(args, k) for k in keys}, "cellsam benchmark", lists_as_one_flag=True)


def evaluate(args: argparse.Namespace, json_path: Path) -> dict | None:
    """Evaluate as ``cellsam evaluate`` with :func:`evaluate_argv` would (tables printed, JSON and plots
    written, those arguments recorded); the report as its JSON holds it, or None after an error message."""
    import time

    from cellsam.cli import build_parser
    from cellsam.cli.evaluate import data_options
    from cellsam.eval.harness import InputError, as_json, format_tables, write_json
    from cellsam.eval.runner import data_plots, evaluate_data, finish_report

    t0 = time.perf_counter()
    ev = build_parser().parse_args(evaluate_argv(args, json_path))
    try:
        report, items, kept = evaluate_data(ev.data, ev.split, **data_options(ev))
    except (InputError, FileNotFoundError, ValueError, KeyError, ImportError) as e:
        print(f"cellsam benchmark: error: {e}", file=sys.stderr)
        return None
    finish_report(report, vars(ev), t0)
    print(format_tables(report))
    print(f"wrote {write_json(json_path, report)}")
    if ev.plots is not None:
        paths = data_plots(report, items, kept, ev.plots, ev.worst)
        print("wrote " + ", ".join(str(p) for p in paths))
    return as_json(report)


def run(args: argparse.Namespace) -> int:
    from cellsam.eval.report import accuracy_markdown

    notes = ""
    if args.notes is not None:
        if not args.notes.is_file():
            print(f"cellsam benchmark: error: notes file {args.notes} not found", file=sys.stderr)
            return 2
        notes = args.notes.read_text()
    if args.merge:
        missing = [str(p) for p in args.merge if not p.is_file()]
        if missing:
            print(f"cellsam benchmark: error: report(s) not found: {', '.join(missing)}", file=sys.stderr)
            return 2
        try:
            reports = [json.loads(p.read_text()) for p in args.merge]
        except json.JSONDecodeError as e:
            print(f"cellsam benchmark: error: not a JSON report: {e}", file=sys.stderr)
            return 2
    else:
        json_path = args.json or args.out.parent / f"accuracy_{args.split}.json"
        report = evaluate(args, json_path)
        if report is None:
            return 2
        reports = [report]
    n_images = len(reports[0].get("images", []))
    title = args.title or (f"Accuracy on the {reports[0].get('split', args.split)} split of "
                           f"{reports[0].get('data', args.data)} ({n_images} images)")
    try:
        page = accuracy_markdown(reports, title=title, notes=notes, made_by=benchmark_command(args))
    except (ValueError, KeyError) as e:
        print(f"cellsam benchmark: error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page)
    print(f"wrote {args.out}")
    return 0
