"""``cellsam prepare SOURCE... -o OUT``: annotated data -> training-ready 512x512 tiles.

A thin shell over :func:`cellsam.data.prepare.prepare_dataset`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

from cellsam.data.normalize import STAIN_GREYS

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``prepare`` sub-command."""
    p = subparsers.add_parser(
        "prepare",
        help="turn annotated images into training tiles (npy + COCO) with leak-free splits",
        description=(
            "Read annotated sources (folders or .npz/.json files), normalise them to CellSAM's channels "
            "(R empty, G nuclear, B whole-cell; CLAHE), tile to 512x512 with 25% overlap, split 80/10/10 "
            "by source image (or the source's own split), and write OUT/<split>/{images,labels}.npy, "
            "tiles.json, coco.json, images.json and OUT/dataset.json."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="data folder or file; one per data set")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "pairs", "dsb", "npz", "coco", "multichannel"],
        help="layout of the sources (default: detect)",
    )
    p.add_argument(
        "--target",
        choices=["nuclear", "whole-cell"],
        default=None,
        help="what the labels outline, for images not listed in a manifest.csv beside the data",
    )
    p.add_argument(
        "--split-seed", type=int, default=0, help="salt of the hash that assigns splits (default 0)"
    )
    p.add_argument(
        "--rescale",
        type=float,
        default=None,
        help="resize factor before tiling (bicubic images, nearest labels), e.g. 2 for LIVECell",
    )
    p.add_argument(
        "--stain-grey",
        choices=list(STAIN_GREYS),
        default="luminance",
        help="grey of stained bright-field colour pictures (H&E, IHC): inverted luminance (default, the "
        "models up to v6) or the hematoxylin channel (colour deconvolution); recorded in dataset.json, and "
        "a model trained on the data carries it",
    )
    p.add_argument(
        "--stats", action="store_true", help="also report annotated cells per data type (stats.json)"
    )
    p.add_argument(
        "--on-error",
        choices=["skip", "stop"],
        default="skip",
        help="on a bad input file: report it and go on (skip, default) or stop",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _table(title: str, rows: dict[str, dict[str, int]], cols: tuple[str, ...]) -> str:
    width = max([len(title)] + [len(k) for k in rows]) + 2
    cw = [max(10, len(c) + 2) for c in cols]
    lines = [title.ljust(width) + "".join(c.rjust(w) for c, w in zip(cols, cw, strict=True))]
    for k, v in rows.items():
        lines.append(
            k.ljust(width) + "".join(str(v.get(c, 0)).rjust(w) for c, w in zip(cols, cw, strict=True))
        )
    return "\n".join(lines)


def format_summary(manifest: dict[str, Any]) -> str:
    """Human-readable summary tables of a ``dataset.json`` content."""
    c = manifest["counts"]
    cols = ("images", "tiles", "cells", "tile_cells")
    parts = [
        _table("split", c["split"], cols),
        _table("source", c["source"], cols),
        _table("split/source", c["split_source"], cols),
    ]
    drop_cols = sorted({k for d in c["dropped"].values() for k in d})
    parts.append(_table("dropped (objects)", c["dropped"], tuple(drop_cols)))
    parts.append(f"near/exact duplicates moved to train: {manifest['duplicates_moved_to_train']} images")
    parts.append(f"bad inputs skipped: {len(manifest['errors'])}")
    return "\n\n".join(parts)


def format_stats(manifest: dict[str, Any]) -> str:
    """Annotated cells per data type (target | kind), as a text bar chart (paper Fig. 2a)."""
    kinds = manifest["counts"]["kind"]
    top = max([v["cells"] for v in kinds.values()] + [1])
    width = max(len(k) for k in kinds) + 2 if kinds else 10
    lines = ["annotated cells per data type"]
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]["cells"]):
        lines.append(f"{k.ljust(width)}{v['cells']:>9} {'#' * max(1, round(40 * v['cells'] / top))}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``cellsam prepare``; returns 0 on success, 1 on a stopped or empty run."""
    from cellsam import __version__
    from cellsam.data.prepare import PrepareError, PrepareOptions, prepare_dataset

    opts = PrepareOptions(
        fmt=args.format,
        target=args.target,
        split_seed=args.split_seed,
        rescale=args.rescale,
        on_error=args.on_error,
        progress=not args.no_progress,
        stain_grey=args.stain_grey,
    )
    argv = sys.argv[1:]
    command = (
        shlex.join(["cellsam", *argv])
        if "prepare" in argv
        else shlex.join(["cellsam", "prepare", *args.sources, "-o", args.out])
    )
    try:
        manifest = prepare_dataset(
            args.sources, args.out, options=opts, command=command, version=__version__, stats=args.stats
        )
    except PrepareError as e:
        print(f"error: {e} (stopping: --on-error stop)", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(manifest))
    if args.stats:
        print()
        print(format_stats(manifest))
    print(f"\nwrote {args.out}/dataset.json")
    return 0
