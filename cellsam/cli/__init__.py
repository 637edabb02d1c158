"""The ``cellsam`` command: one entry point, one thin module per sub-command.

Each sub-command module exposes ``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# sub-command name -> module under cellsam.cli (imported lazily, so `cellsam --help` is fast)
COMMANDS: dict[str, str] = {
    "segment": "segment",
    "prepare": "prepare",
    "train": "train",
    "evaluate": "evaluate",
    "benchmark": "benchmark",
    "bench": "bench",
    "serve": "serve",
    "models": "models",
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (all sub-commands)."""
    from cellsam import __version__

    parser = argparse.ArgumentParser(prog="cellsam", description="Cell segmentation with CellSAM.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"cellsam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f"cellsam.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"cellsam.cli.{module}":
                continue  # sub-command not built yet
            raise
        mod.add_parser(sub)
    return parser


THREAD_POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Set by the command line before torch loads, unless the user's environment sets them: with OpenMP's
default spin-waiting, one 696x520 image took 61-80 s beside two busy processes against 7.5-9.8 s with
PASSIVE (measured on the 2-core machine with cellsam_cpu.v2)."""


def apply_thread_policy(environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, str]:
    """Fill in :data:`THREAD_POLICY` where ``environ`` leaves it unset; returns what was set."""
    added = {k: v for k, v in THREAD_POLICY.items() if k not in environ}
    environ.update(added)
    return added


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cellsam`` console script; returns the exit code."""
    apply_thread_policy()  # before the sub-commands import torch (OpenMP reads it when it loads)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
