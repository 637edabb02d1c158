"""Markdown accuracy reports (``benchmarks/accuracy.md``) from ``cellsam evaluate --json`` reports.

One or more reports of the same images (same ``--data`` and ``--split``; methods evaluated in one run or
in several) are merged into one table set; the page names the commands that made them (as recorded in
each report's ``arguments``) and the environment, so every number can be reproduced.
"""

from __future__ import annotations

import json
from typing import Any

from cellsam.eval.harness import format_tables


def command_line(arguments: dict[str, Any], command: str = "cellsam evaluate", *,
                 lists_as_one_flag: bool = False) -> str:
    """The command line of recorded arguments (flags at their default values included; unset ones, i.e.
    None, False, empty lists and empty strings, left out).

    List values become one flag per item (``--baseline a --baseline b``, argparse's ``append``) or, with
    ``lists_as_one_flag``, one flag with every item (``--merge a b``, ``nargs="+"``). Values holding a
    space are quoted.
    """
    parts = [command]
    for k, v in arguments.items():
        flag = "--" + k.replace("_", "-")
        if k == "command" or v in (None, False, [], (), "None", ""):
            continue
        if v is True:
            parts.append(flag)
        elif isinstance(v, (list, tuple)):
            items = [str(x) for x in v]
            parts += [f"{flag} " + " ".join(items)] if lists_as_one_flag else [f"{flag} {x}" for x in items]
        else:
            parts.append(f'{flag} "{v}"' if " " in str(v) else f"{flag} {v}")
    return " ".join(parts)


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report holding every method of ``reports``, which must cover the same images.

    Raises:
        ValueError: no reports, reports of different images, or a method name in two reports.
    """
    if not reports:
        raise ValueError("no reports to merge")
    names = [[im.get("name") for im in r.get("images", [])] for r in reports]
    if any(n != names[0] for n in names[1:]):
        raise ValueError("the reports cover different images: evaluate the same --data and --split")
    merged = dict(reports[0])
    merged["methods"] = {}
    for r in reports:
        for k, v in r["methods"].items():
            if k in merged["methods"]:
                raise ValueError(f"method {k!r} is in two reports")
            merged["methods"][k] = v
    return merged


def accuracy_markdown(reports: list[dict[str, Any]], *, title: str, notes: str = "",
                      made_by: str | None = None) -> str:
    """The markdown page: title, notes, the command that made it (``made_by``), the commands of the
    reports, the environment and every table of the merged reports."""
    merged = merge_reports(reports)
    lines = [f"# {title}", ""]
    if notes.strip():
        lines += [notes.strip(), ""]
    if made_by:
        lines += [f"Made by `{made_by}`.", ""]
    lines += ["Commands (arguments as recorded in each JSON report):", ""]
    lines += [f"- `{command_line(r.get('arguments', {}))}`" for r in reports]
    env = reports[0].get("environment", {})
    lines += ["", f"Environment: {json.dumps(env)}", "", "```", format_tables(merged), "```", ""]
    return "\n".join(lines)
