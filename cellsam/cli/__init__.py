"""The ``cellsam`` command: one entry point, one thin module per sub-command.

Each sub-command module exposes ``add_parser(subparsers)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cellsam.threads import THREAD_POLICY, apply_thread_policy

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


def help_text(doc: str) -> str:
    """A sub-command module's docstring, less its first paragraph, as ``--help`` prints it: reST roles
    (:func:`~a.b.name`) become their name and double back-quotes plain quotes."""
    import re

    body = doc.split("\n\n", 1)[1]
    def role(m: re.Match[str]) -> str:
        return m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)

    body = re.sub(r":\w+:`(~?)([^`]+)`", role, body)
    return body.replace("``", "'")


def add_flip_test_options(p: argparse.ArgumentParser, what: str) -> None:
    """``--flip-test MODE`` and ``--no-flip-test`` (``off``) into ``args.flip_test`` (None when neither is
    given: the model's own). MODE is required, so that ``--flip-test image.tif`` cannot take a file for it.
    ``what`` ends the help of ``--flip-test``."""
    from cellsam.config import FLIP_TESTS

    p.add_argument("--flip-test", choices=FLIP_TESTS, default=None, metavar="{" + ",".join(FLIP_TESTS) + "}",
                   help="the detector also looks at each tile mirrored and decodes the mean: 'rot180' the tile "
                   "turned 180 degrees, one more trunk pass per tile; 'mirrors' left-right and up-down, two more "
                   f"passes; 'off' the one view (benchmarks/flip_test.md); {what}")
    p.add_argument("--no-flip-test", dest="flip_test", action="store_const", const="off",
                   help="the same as --flip-test off")


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


# ``import cellsam`` (which importing this module implies) already applied the thread policy, before
# any sub-command imports torch; re-exported here for callers of the command line's API.
__all__ = ["COMMANDS", "THREAD_POLICY", "apply_thread_policy", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cellsam`` console script; returns the exit code."""
    apply_thread_policy()  # a no-op after `import cellsam`, unless the environment was changed since
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
