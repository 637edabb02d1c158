"""``cellsam bench --busy-neighbour N``: the neighbours' lifetime, the busy / quiet ratios and the report.

Cheap: vit_tiny on one 64x64 scene, one repeat, one neighbour; no timing value is asserted.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from cellsam.bench import timing
from cellsam.bench.busy import busy_comparisons, busy_neighbours
from cellsam.bench.suite import BenchSpec


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_neighbours_burn_while_the_block_runs_and_are_gone_after() -> None:
    with busy_neighbours(0) as none:
        assert none == []
    with busy_neighbours(2) as pids:
        assert len(pids) == 2
        time.sleep(0.5)
        if os.path.exists(f"/proc/{pids[0]}/stat"):
            assert all(_cpu_seconds(p) > 0.05 for p in pids)  # they burn CPU
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ValueError, match=">= 0"):
        with busy_neighbours(-1):
            pass



def test_neighbours_stop_when_the_bench_is_killed() -> None:
    import signal
    import subprocess
    import sys

    code = ("import sys, time\nfrom cellsam.bench.busy import busy_neighbours\n"
            "with busy_neighbours(1) as pids:\n    print(pids[0], flush=True)\n    time.sleep(60)\n")
    bench = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert bench.stdout is not None
    pid = int(bench.stdout.readline())
    os.kill(pid, 0)  # burning
    bench.send_signal(signal.SIGKILL)  # no cleanup runs in the bench
    bench.wait()
    bench.stdout.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped by its new parent
                break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("a busy neighbour outlived its killed bench")

def _run(pipeline: str, median: float, neighbours: int, **kw: object) -> dict:
    return {"pipeline": pipeline, "model": "m", "size": [64, 64], "cells": 20, "precision": "fp32",
            "decode_window": 3.0, "end_to_end": timing.summarize([median]), "neighbours": neighbours, **kw}


def test_busy_comparisons_pair_each_configuration() -> None:
    runs = [_run("cellsam", 1.0, 0), _run("reference", 4.0, 0), _run("cellsam", 1.0, 0, precision="bf16"),
            _run("cellsam", 3.0, 0, diameter="auto"),
            _run("cellsam", 2.5, 2), _run("reference", 6.0, 2), _run("cellsam", 4.5, 2, diameter="auto")]
    out = busy_comparisons(runs)
    assert [(b["pipeline"], b["precision"], b["diameter"], b["quiet_s"], b["busy_s"], b["slowdown"])
            for b in out] == [("cellsam", "fp32", None, 1.0, 2.5, 2.5), ("reference", "fp32", None, 4.0, 6.0, 1.5),
                              ("cellsam", "fp32", "auto", 3.0, 4.5, 1.5)]  # each scale beside its own quiet run
    assert out[0]["neighbours"] == 2
    assert busy_comparisons(runs[:4]) == []  # no busy pass
    with pytest.raises(ValueError, match="busy_neighbours"):
        BenchSpec(busy_neighbours=-2).validate()


def test_cli_bench_times_quiet_then_busy_in_one_run(tmp_path) -> None:
    from cellsam.cli import main

    out = tmp_path / "busy"
    assert main(["bench", "--model", "vit_tiny", "--sizes", "64", "--cells", "20", "--repeats", "1", "--warmup",
                 "0", "--busy-neighbour", "1", "--no-plot", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["neighbours"] for r in res["runs"]] == [0, 1]
    assert res["spec"]["busy_neighbours"] == 1 and res["command"][-4:-2] == ["--busy-neighbour", "1"]
    (b,) = res["busy"]
    assert b["slowdown"] == pytest.approx(b["busy_s"] / b["quiet_s"]) and b["neighbours"] == 1
    assert len(res["comparisons"]) == 1  # the quiet run only
    md = out.with_suffix(".md").read_text()
    assert "## Beside 1 busy process(es)" in md and "| cellsam (+1 busy) | vit_tiny |" in md
    env = res['machine']['env']
    assert f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, GOMP_SPINCOUNT={env['GOMP_SPINCOUNT']}." in md
    assert main(["bench", "--model", "vit_tiny", "--busy-neighbour", "-1", "--out", str(tmp_path / "x")]) == 2
    assert main(["bench", "--prompts", "--busy-neighbour", "1", "--out", str(tmp_path / "x")]) == 2
