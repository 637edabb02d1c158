"""Busy neighbours: processes that keep CPU cores busy while a second timing pass runs
(``cellsam bench --busy-neighbour N``), and the busy / quiet ratio of each configuration.

A neighbour is a pure-Python loop in its own process (one core each, no OpenMP), standing in for the
other work of a shared workstation or cluster node. The pass beside them shows what OpenMP's wait
policy costs there (``OMP_WAIT_POLICY``, recorded in the report's machine section; see
:mod:`cellsam.threads`).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

# burns until its parent is gone (a killed bench cannot leave it burning: it then belongs to another parent)
_BURN = ("import os, sys\nparent = os.getppid()\nsys.stdout.write('ready\\n')\nsys.stdout.flush()\n"
         "while os.getppid() == parent:\n    for _ in range(200000):\n        pass\n")


@contextlib.contextmanager
def busy_neighbours(n: int) -> Iterator[list[int]]:
    """Run ``n`` CPU-burning processes for the duration of the block (each has started burning before the
    block begins); yields their pids. They are terminated (killed if need be) when the block ends."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"busy neighbours must be an integer >= 0, got {n!r}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", _BURN], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE))
        for p in procs:
            if p.stdout is None or p.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"a busy neighbour (pid {p.pid}) did not start")
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


def _config(r: dict[str, Any]) -> tuple:
    return (r["pipeline"], r["model"], tuple(r["size"]), r["cells"], r.get("scene", "synthetic"),
            r["precision"], r.get("decode_window"), r.get("diameter"))


def busy_comparisons(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration timed both quiet (``neighbours`` 0) and beside busy neighbours: the two medians and
    ``slowdown`` = busy / quiet (1: unaffected; the 696x520 image of #19 was 6-8x with spinning threads)."""
    quiet = {_config(r): r for r in runs if not r.get("neighbours")}
    out = []
    for r in runs:
        q = quiet.get(_config(r)) if r.get("neighbours") else None
        if q is None:
            continue
        qs, bs = q["end_to_end"]["median"], r["end_to_end"]["median"]
        out.append({
            "pipeline": r["pipeline"], "model": r["model"], "size": r["size"], "cells": r["cells"],
            "scene": r.get("scene", "synthetic"), "precision": r["precision"],
            "decode_window": r.get("decode_window"), "diameter": r.get("diameter"),
            "diameter_used": r.get("diameter_used"), "neighbours": r["neighbours"],
            "quiet_s": qs, "busy_s": bs, "slowdown": bs / qs if qs > 0 else None,
        })
    return out
