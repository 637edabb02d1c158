"""Merge `cellsam evaluate --json` reports of one split into benchmarks/accuracy.md (tables of every method).

    python scripts/accuracy_report.py benchmarks/accuracy_val.json benchmarks/accuracy_baselines_val.json \\
        -o benchmarks/accuracy.md --title "Validation split (prepared/val, 72 full images)"

The reports must cover the same images (same --data and --split); methods keep their names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cellsam.eval.harness import format_tables


def command_line(arguments: dict) -> str:
    """The `cellsam evaluate` command line of a report's recorded arguments (defaults included)."""
    parts = ["cellsam evaluate"]
    for k, v in arguments.items():
        flag = "--" + k.replace("_", "-")
        if k == "command" or v in (None, False, [], "None"):
            continue
        if v is True:
            parts.append(flag)
        elif isinstance(v, list):
            parts += [f"{flag} {x}" for x in v]
        else:
            parts.append(f"{flag} {v}")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, default=Path("benchmarks/accuracy.md"))
    ap.add_argument("--title", default="Accuracy")
    ap.add_argument("--notes", default="", help="markdown put between the title and the tables")
    args = ap.parse_args()
    reports = [json.loads(p.read_text()) for p in args.reports]
    names = [[im.get("name") for im in r.get("images", [])] for r in reports]
    if any(n != names[0] for n in names[1:]):
        raise SystemExit("the reports cover different images: evaluate the same --data and --split")
    merged = dict(reports[0])
    merged["methods"] = {k: v for r in reports for k, v in r["methods"].items()}
    commands = [command_line(r.get("arguments", {})) for r in reports]
    lines = [f"# {args.title}", "", args.notes, "", "Commands (arguments as recorded in each JSON report):", ""]
    lines += [f"- `{c}`" for c in commands]
    env = reports[0].get("environment", {})
    lines += ["", f"Environment: {json.dumps(env)}", "", "```", format_tables(merged), "```", ""]
    args.out.write_text("\n".join(lines))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
