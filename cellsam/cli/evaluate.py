"""``cellsam evaluate``: every metric, per source and per data type, for label images or for models.

Two modes:

- ``--pred DIR --gt DIR``: score any tool's label images against ground truth. Files are paired by name:
  the image suffix and one trailing tag (``_labels``, ``_label``, ``_masks``, ``_mask``, ``_cp_masks``,
  ``_seg``, ``_pred``, ``_gt``) are removed, so ``x_labels.tif`` (``cellsam segment``), ``x_cp_masks.png``
  (Cellpose) and ``x_masks.png`` all pair with ``x_masks.png``. Where a folder holds tagged files, only
  those are read (images and overlays beside them are ignored). A ground truth without a prediction is an
  error (``--missing-as-empty`` scores it as an empty prediction); predictions without a ground truth are
  listed and ignored.
- ``--data PREPARED_OR_FOLDER``: run ``--model`` (default: the shipped model; ``none`` for baselines
  only), each ``--baseline`` (``otsu``, ``cellpose:MODEL_FILE``, either as ``NAME=...`` to name its
  method) and, with ``--prompt-study``, the model's
  masks from ground-truth box and point prompts, on the full images of ``--split`` of a prepared set (or
  on any folder ``cellsam prepare`` reads).

Prints one table per method by source and by data type; ``--json`` writes every number (per image too);
``--plots DIR`` writes ``f1_by_data_type.png`` and ``worst_<method>.png``. Exit code 0, or 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from cellsam.cli import add_flip_test_options, help_text
from cellsam.config import DEFAULT_DECODE_WINDOW
from cellsam.inference.params import DEFAULT_MIN_AREA_REL


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``cellsam`` command."""
    p = subparsers.add_parser(
        "evaluate", help="score segmentations with every metric (F1, AP, mSA, AJI, COCO)",
        description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", type=Path, help="folder of predicted label images")
    p.add_argument("--gt", type=Path, help="folder of ground-truth label images")
    p.add_argument("--missing-as-empty", action="store_true",
                   help="score a ground truth without prediction as an empty prediction")
    p.add_argument("--data", type=Path, help="prepared dataset (cellsam prepare output) or annotated folder")
    p.add_argument("--split", default="val", help="split of a prepared dataset (default val)")
    p.add_argument("--model", default=None,
                   help="weights name or checkpoint for --data (default: 'default'; 'none' = no model)")
    p.add_argument("--baseline", action="append", default=[], metavar="[NAME=]otsu|cellpose:PATH",
                   help="add a baseline (repeatable; NAME= names its method, e.g. cp_long=cellpose:PATH, for "
                   "two Cellpose models in one run)")
    p.add_argument("--prompt-study", action="store_true",
                   help="also score the model's masks from ground-truth box and point prompts")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--sources", nargs="+", default=[], metavar="SOURCE",
                   help="with --data: only the images of these sources (e.g. monuseg)")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots into this folder")
    p.add_argument("--worst", type=int, default=6, help="worst images per method in the plots (default 6)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="default: auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="CellSAM autocast precision")
    p.add_argument("--box-threshold", type=float, default=None,
                   help="minimum detector score (default: the model's own, 0.4 in the paper)")
    p.add_argument("--box-threshold-rel", type=float, default=None,
                   help="relative detector score: drop cells under this x the 90th percentile of the image's "
                        "(default: the model's own; 0: off)")
    p.add_argument("--iou-threshold", type=float, default=None, help="minimum predicted mask IoU (default: model's)")
    p.add_argument("--mask-threshold", type=float, default=None, help="mask probability threshold (default: model's)")
    p.add_argument("--min-area-rel", type=float, default=DEFAULT_MIN_AREA_REL, metavar="F",
                   help="drop cells under F x the median area of the image's cells "
                   f"(default {DEFAULT_MIN_AREA_REL:g}, as `cellsam segment`; 0: off)")
    p.add_argument("--tile-size", type=int, default=None, help="tile side (default: the model's own)")
    p.add_argument("--decode-copies", action="store_true",
                   help="decode a cell in every overlapping tile that detects it (as `cellsam segment`)")
    p.add_argument("--decode-window", type=float, default=DEFAULT_DECODE_WINDOW, metavar="X",
                   help=f"decoder token window per box, x its longer side (default {DEFAULT_DECODE_WINDOW:g}; "
                   "as `cellsam segment`); 0: whole frames")
    add_flip_test_options(p, "as `cellsam segment`; default: the model's own")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`cellsam.eval.runner.evaluate_data` keyword arguments of parsed ``evaluate --data`` options."""
    return dict(sources=args.sources, limit=args.limit, progress=not args.no_progress, model=args.model,
                baselines=args.baseline, prompt_study=args.prompt_study, device=args.device, precision=args.precision,
                box_threshold=args.box_threshold, box_threshold_rel=args.box_threshold_rel,
                iou_threshold=args.iou_threshold,
                mask_threshold=args.mask_threshold, min_area_rel=args.min_area_rel, tile_size=args.tile_size,
                decode_copies=args.decode_copies,
                decode_window=args.decode_window, flip_test=args.flip_test)


def run(args: argparse.Namespace) -> int:
    """Run ``cellsam evaluate``; 0 on success, 2 on bad input."""
    from cellsam.eval.folders import evaluate_folders
    from cellsam.eval.harness import InputError, format_tables, write_json
    from cellsam.eval.runner import data_plots, evaluate_data, finish_report, folder_plots

    t0 = time.perf_counter()
    try:
        if (args.pred is None) != (args.gt is None):
            raise InputError("--pred and --gt go together")
        if args.pred is not None and args.sources:
            raise InputError("--sources selects images of --data; with --pred/--gt every paired file is scored")
        if args.pred is not None and args.data is not None:
            raise InputError("give either --pred/--gt or --data, not both")
        if args.pred is None and args.data is None:
            raise InputError("give --pred DIR --gt DIR, or --data PREPARED_OR_FOLDER [--model M]")
        if args.pred is not None:
            report, arrays = evaluate_folders(args.pred, args.gt, missing_as_empty=args.missing_as_empty)
        else:
            report, items, kept = evaluate_data(args.data, args.split, **data_options(args))
    except (InputError, FileNotFoundError, ValueError, KeyError, ImportError) as e:
        print(f"cellsam evaluate: error: {e}", file=sys.stderr)
        return 2
    finish_report(report, vars(args), t0)
    print(format_tables(report))
    if args.json is not None:
        print(f"wrote {write_json(args.json, report)}")
    if args.plots is not None:
        if args.pred is not None:
            paths = folder_plots(report, arrays, args.plots, args.worst)
        else:
            paths = data_plots(report, items, kept, args.plots, args.worst)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
