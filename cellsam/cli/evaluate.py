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
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from cellsam.config import DEFAULT_DECODE_WINDOW

log = logging.getLogger(__name__)

LABEL_TAGS = ("_cp_masks", "_labels", "_label", "_masks", "_mask", "_seg", "_pred", "_gt")
LABEL_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".npy")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``cellsam`` command."""
    p = subparsers.add_parser(
        "evaluate", help="score segmentations with every metric (F1, AP, mSA, AJI, COCO)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument("--iou-threshold", type=float, default=None, help="minimum predicted mask IoU (default: model's)")
    p.add_argument("--mask-threshold", type=float, default=None, help="mask probability threshold (default: model's)")
    p.add_argument("--tile-size", type=int, default=None, help="tile side (default: the model's own)")
    p.add_argument("--decode-copies", action="store_true",
                   help="decode a cell in every overlapping tile that detects it (as `cellsam segment`)")
    p.add_argument("--decode-window", type=float, default=DEFAULT_DECODE_WINDOW, metavar="X",
                   help=f"decoder token window per box, x its longer side (default {DEFAULT_DECODE_WINDOW:g}; "
                   "as `cellsam segment`); 0: whole frames")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _baseline_spec(spec: str) -> tuple[str, str, str]:
    """``[NAME=]KIND[:ARG]`` -> (method name, kind, arg); the name defaults to the kind."""
    head, eq, rest = spec.partition("=")
    if eq and head and ":" not in head and "/" not in head:
        name, spec = head, rest
    else:
        name = ""
    kind, _, arg = spec.partition(":")
    return name or kind, kind, arg


class InputError(ValueError):
    """Bad command-line input (missing / unmatched / unreadable files)."""


# ------------------------------------------------------------------------------------- --pred / --gt
def label_key(path: Path) -> tuple[str, bool]:
    """(pairing key, has a label tag) of a label file name: suffix and one label tag removed."""
    name = path.name
    for suf in LABEL_SUFFIXES:
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    for tag in LABEL_TAGS:
        if name.lower().endswith(tag):
            return name[: -len(tag)], True
    return name, False


def _label_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"--{what} {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and any(p.name.lower().endswith(s) for s in LABEL_SUFFIXES))
    keyed = [(label_key(p), p) for p in files]
    if any(tagged for (_, tagged), _ in keyed):
        keyed = [(kt, p) for kt, p in keyed if kt[1]]
    out: dict[str, Path] = {}
    for (key, _), p in keyed:
        if key in out:
            raise InputError(f"--{what} {folder}: {out[key].name} and {p.name} both pair as {key!r}")
        out[key] = p
    if not out:
        raise InputError(f"--{what} {folder}: no label images (.tif/.png/.npy) found")
    return out


def read_label_image(path: Path) -> Any:
    """(H, W) integer label image from a file; InputError for anything else."""
    import numpy as np

    from cellsam.io import ImageReadError, read_image

    try:
        arr = np.squeeze(read_image(path))
    except ImageReadError as e:
        raise InputError(str(e)) from None
    if arr.ndim != 2:
        raise InputError(f"{path}: a label image must be 2-D, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.int32)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0) and arr.min(initial=0) >= 0:
            arr = arr.astype(np.int64)
        else:
            raise InputError(f"{path}: not a label image (dtype {arr.dtype}; expected integers, 0 = background)")
    if arr.size and arr.min() < 0:
        raise InputError(f"{path}: negative labels")
    return arr


def match_label_files(pred_dir: Path, gt_dir: Path, *, missing_as_empty: bool = False
                      ) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    """Pair ground-truth and predicted label files by name.

    Returns:
        (name, gt path, pred path or None if missing and ``missing_as_empty``) sorted by name, and the
        names of predictions that have no ground truth.
    Raises:
        InputError: a ground truth without prediction (unless ``missing_as_empty``), or no pair at all.
    """
    gts = _label_files(gt_dir, "gt")
    preds = _label_files(pred_dir, "pred")
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    if missing and not missing_as_empty:
        shown = ", ".join(gts[k].name for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise InputError(f"{len(missing)} ground-truth file(s) have no prediction in {pred_dir}: {shown} "
                         f"(predictions found: {', '.join(sorted(preds)[:5])}...; names pair after removing "
                         f"{'/'.join(LABEL_TAGS)}; --missing-as-empty scores them as empty)")
    if len(missing) == len(gts):
        raise InputError(f"no prediction in {pred_dir} pairs with a ground truth in {gt_dir}")
    return [(k, gts[k], preds.get(k)) for k in sorted(gts)], extra


def evaluate_folders(pred_dir: Path, gt_dir: Path, *, missing_as_empty: bool = False) -> tuple[dict, dict]:
    """Report (harness layout, one method "pred") of label images in two folders, and the label arrays
    ``{name: (gt, pred)}`` for plots."""
    import numpy as np

    from cellsam.eval.harness import Prediction, score_predictions

    pairs, extra = match_label_files(pred_dir, gt_dir, missing_as_empty=missing_as_empty)
    for name in extra:
        log.warning("prediction %s has no ground truth: ignored", name)
    arrays: dict[str, tuple[Any, Any]] = {}
    for name, g, p in pairs:
        gt = read_label_image(g)
        pred = read_label_image(p) if p is not None else np.zeros_like(gt)
        if pred.shape != gt.shape:
            raise InputError(f"{name}: prediction {p} has shape {pred.shape}, ground truth {g} {gt.shape}")
        arrays[name] = (gt, pred)
    gts = [a[0] for a in arrays.values()]
    preds = [Prediction(a[1]) for a in arrays.values()]
    overall = score_predictions(gts, preds, per_image=True)
    rows = overall.pop("per_image")
    for row, name in zip(rows, arrays, strict=True):
        row.update(name=name, source=gt_dir.name, data_type="all", seconds=0.0,
                   pred_file=str(dict((n, p) for n, _, p in pairs)[name]))
    report = {
        "mode": "pred-gt", "pred": str(pred_dir), "gt": str(gt_dir), "unmatched_predictions": extra,
        "images": [{"name": n, "source": gt_dir.name, "data_type": "all"} for n in arrays],
        "methods": {"pred": {"overall": overall, "by_source": {}, "by_data_type": {}, "per_image": rows}},
    }
    return report, arrays


# ---------------------------------------------------------------------------------------- --data
def _methods(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    from cellsam.eval import baselines
    from cellsam.eval.harness import cellsam_method

    methods: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    model_name = args.model if args.model is not None else "default"
    if model_name.lower() != "none":
        from cellsam.inference.runtime import resolve_model

        net, _ = resolve_model(model_name, args.device)
        inf = net.cfg.inference  # the model's own thresholds unless given
        kw = dict(box_threshold=inf.box_threshold if args.box_threshold is None else args.box_threshold,
                  iou_threshold=inf.iou_threshold if args.iou_threshold is None else args.iou_threshold,
                  mask_threshold=inf.mask_threshold if args.mask_threshold is None else args.mask_threshold,
                  tile_size=args.tile_size, precision=args.precision, decode_copies=args.decode_copies,
                  decode_window=args.decode_window)
        methods["cellsam"] = cellsam_method(net, **kw)
        settings["cellsam"] = {"model": model_name, **kw}
        if args.prompt_study:
            from cellsam.eval.prompts import prompt_method

            for prompt in ("box", "point"):
                methods[f"prompt:{prompt}"] = prompt_method(net, prompt, mask_threshold=kw["mask_threshold"],
                                                            tile_size=args.tile_size)
            settings["prompt_study"] = "ground-truth prompts, one per cell; masks scored by predicted IoU"
    elif args.prompt_study:
        raise InputError("--prompt-study needs a model (not --model none)")
    for spec in args.baseline:
        name, kind, arg = _baseline_spec(spec)
        if name in methods:
            raise InputError(f"--baseline {spec!r}: a method named {name!r} is already evaluated; name this one "
                             f"with NAME={kind}{':' + arg if arg else ''}")
        if kind == "otsu" and not arg:
            methods[name] = baselines.otsu_method()
            settings[name] = "Otsu on the blue channel + distance-transform watershed"
        elif kind == "cellpose" and arg:
            methods[name] = baselines.cellpose_method(Path(arg), device="cpu" if args.device == "auto"
                                                      else args.device)
            settings[name] = {"model": arg}
            record = Path(arg).parent.parent / f"{Path(arg).name}.json"
            if record.is_file():
                import json

                settings[name]["training"] = json.loads(record.read_text())
        else:
            raise InputError(f"unknown --baseline {spec!r}: use 'otsu' or 'cellpose:MODEL_FILE', optionally "
                             "as NAME=otsu / NAME=cellpose:MODEL_FILE")
    if not methods:
        raise InputError("nothing to evaluate: give --model and/or --baseline")
    return methods, settings


def _plots_for_data(report: dict, items: list, kept: dict, outdir: Path, k: int) -> list[Path]:
    from cellsam.eval.plots import Example, plot_examples, plot_f1_by_data_type, worst_images

    paths = [plot_f1_by_data_type(report, outdir / "f1_by_data_type.png")]
    for name, res in report["methods"].items():
        ex = []
        for i in worst_images(report, name, k):
            image, gt = items[i].load()
            ex.append(Example(items[i].name, image, gt, kept[name][i], float(res["per_image"][i]["deepcell"]["f1"])))
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        paths.append(plot_examples(ex, outdir / f"worst_{safe}.png", title=f"{name}: worst images"))
    return paths


def run(args: argparse.Namespace) -> int:
    """Run ``cellsam evaluate``; 0 on success, 2 on bad input."""
    from cellsam.eval.harness import environment, format_tables, load_data, write_json

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
            items = load_data(args.data, args.split, limit=None if args.sources else args.limit)
            if args.sources:
                from cellsam.data.splits import select_sources

                items = [items[i] for i in select_sources([it.source for it in items], include=args.sources)]
                items = items[: args.limit] if args.limit is not None else items
            methods, settings = _methods(args)
            kept: dict[str, dict[int, Any]] = {m: {} for m in methods}
            index = {id(it): i for i, it in enumerate(items)}

            def keep(method: str, item: Any, gt: Any, pred: Any) -> None:
                kept[method][index[id(item)]] = pred.labels

            from cellsam.eval.harness import evaluate_methods

            report = evaluate_methods(items, methods, progress=not args.no_progress, keep=keep)
            report.update(mode="data", data=str(args.data), split=args.split, settings=settings)
    except (InputError, FileNotFoundError, ValueError, KeyError, ImportError) as e:
        print(f"cellsam evaluate: error: {e}", file=sys.stderr)
        return 2
    report["environment"] = environment()
    report["arguments"] = {k: (list(v) if isinstance(v, tuple) else v
                               if isinstance(v, (int, float, bool, list)) or v is None else str(v))
                           for k, v in vars(args).items() if k != "func"}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    print(format_tables(report))
    if args.json is not None:
        print(f"wrote {write_json(args.json, report)}")
    if args.plots is not None:
        if args.pred is not None:
            import numpy as np

            from cellsam.eval.plots import Example, plot_examples, plot_f1_by_data_type, worst_images

            rows = report["methods"]["pred"]["per_image"]
            names = list(arrays)
            ex = [Example(names[i], np.zeros((3, *arrays[names[i]][0].shape), np.float32), *arrays[names[i]],
                          float(rows[i]["deepcell"]["f1"])) for i in worst_images(report, "pred", args.worst)]
            paths = [plot_f1_by_data_type(report, args.plots / "f1_by_data_type.png"),
                     plot_examples(ex, args.plots / "worst_pred.png")]
        else:
            paths = _plots_for_data(report, items, kept, args.plots, args.worst)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
