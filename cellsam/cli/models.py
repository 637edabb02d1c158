"""``cellsam models``: list variants and named weights, download weights, compare two weight files."""

from __future__ import annotations

import argparse
import logging

from cellsam.registry import WeightsRecord

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cellsam models {list,download,compare}``."""
    p = subparsers.add_parser(
        "models",
        help="list or download model weights",
        description="List architecture variants and named weights, download weights, or compare two "
                    "weight files tensor by tensor (did a re-run reproduce a model?).",
    )
    sub = p.add_subparsers(dest="models_command", required=True)
    sub.add_parser("list", help="variants and weights with version and cache state")
    d = sub.add_parser("download", help="download (or verify bundled) weights into $CELLSAM_HOME")
    d.add_argument("name", help="weights name or alias, e.g. 'default'")
    d.add_argument("--force", action="store_true", help="download again even if cached")
    c = sub.add_parser("compare", help="compare two weight files tensor by tensor; exit 1 if they differ",
                       description="Compare the tensors of two weight files (.safetensors/.json of ours, "
                                   ".pth/.pt, a training .ckpt, or a registered name): the check that a re-run "
                                   "reproduced a model, whatever the files' formats. "
                                   "Exit code 0: equal within --atol; 1: they differ; 2: bad input.")
    c.add_argument("a", help="first weights file, or registered weights by name (e.g. 'default')")
    c.add_argument("b", help="second weights file or name")
    c.add_argument("--atol", type=float, default=0.0, help="largest absolute difference counted as equal "
                                                           "(default 0: bit-identical)")
    c.add_argument("--top", type=int, default=10, help="how many of the most different tensors to list")
    p.set_defaults(func=run)


def _state(record: WeightsRecord) -> str:
    from cellsam.weights import cached_path

    path = cached_path(record)
    if record.url.startswith("package:"):
        return "bundled" if path.is_file() else "bundled file missing"
    return f"cached ({path})" if path.is_file() else "not downloaded"


def _list() -> int:
    from cellsam.registry import get_weights, list_variants, list_weights
    from cellsam.weights import cache_dir

    print("variants (architectures; cellsam.build_model(NAME) gives an untrained model):")
    for name in list_variants():
        print(f"  {name}")
    names = list_weights()
    print(f"weights (cache: {cache_dir()}):")
    if not names:
        print("  (none registered)")
    for name in names:
        rec = get_weights(name)
        alias = f" -> {rec.name}" if rec.name != name else ""
        print(f"  {name}{alias}  variant={rec.variant}  version={rec.version}  {_state(rec)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from cellsam.weights_diff import compare_weights

    try:
        diff = compare_weights(args.a, args.b, atol=args.atol)
    except KeyError as e:
        logger.error("%s", e.args[0])
        return 2
    except (OSError, ValueError) as e:  # unreadable files (CheckpointError) and a negative --atol
        logger.error("%s", e)
        return 2
    print(diff.summary(top=max(args.top, 0)))
    return 0 if diff.identical else 1


def run(args: argparse.Namespace) -> int:
    """Entry point of ``cellsam models``; returns the exit code."""
    if args.models_command == "list":
        return _list()
    if args.models_command == "compare":
        return _compare(args)
    from cellsam.registry import get_weights
    from cellsam.weights import download

    try:
        record = get_weights(args.name)
    except KeyError as e:
        logger.error("%s", e.args[0])
        return 2
    try:
        path = download(record, force=args.force)
    except (OSError, ValueError) as e:
        logger.error("%s", e)
        return 1
    print(path)
    return 0
