"""Benchmark reports: machine information, ``NAME.json``, ``NAME.md`` and an optional scaling plot."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
        "CUDA_VISIBLE_DEVICES")
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    have = set(line.split(":", 1)[1].split())
                    flags = [fl for fl in _CPU_FLAGS if fl in have]
                    break
    except OSError:
        pass
    return model, flags


def _memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def report_header(schema: str, spec: Any, device: torch.device, command: Sequence[str] | None) -> dict[str, Any]:
    """The keys every bench report starts with: schema, created (UTC), command, machine, spec (a dataclass)."""
    return {
        "schema": schema,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else sys.argv,
        "machine": machine_info(device),
        "spec": asdict(spec),
    }


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """CPU model and flags, cores, memory, torch / numpy / Python versions, threads, env, GPU name."""
    cpu, flags = _cpu_model_and_flags()
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gpu = None
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        gpu = {"name": props.name, "memory_bytes": int(props.total_memory), "cuda": torch.version.cuda}
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_bytes": _memory_total_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in _ENV},
        "device": str(dev),
        "gpu": gpu,
        "git_commit": _git_commit(),
    }


# ---------------------------------------------------------------------------------------------- markdown
def _s(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _gib(b: Any) -> str:
    return "-" if not b else f"{b / 2**30:.2f}"


def _rise(mem: dict[str, Any]) -> str:
    if mem.get("peak_rss_bytes") is None or mem.get("rss_before_bytes") is None or mem.get("rss_method") != "vmhwm":
        return "-"
    return f"{(mem['peak_rss_bytes'] - mem['rss_before_bytes']) / 2**30:.2f}"


def _size(r: dict[str, Any]) -> str:
    return "x".join(str(v) for v in r["size"])


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(result: dict[str, Any]) -> str:
    """The result as markdown: machine, end-to-end table, per-stage table, comparisons, parity, notes."""
    m = result["machine"]
    out = [
        f"# cellsam bench ({result['created']})",
        "",
        f"- Machine: {m['cpu']} ({m['usable_cores']} usable of {m['logical_cores']} logical cores; "
        f"flags {', '.join(m['cpu_flags']) or '-'}), {_gib(m['memory_bytes'])} GiB RAM"
        + (f"; GPU {m['gpu']['name']}" if m.get("gpu") else ""),
        f"- torch {m['torch']} ({m['torch_threads']} threads), numpy {m['numpy']}, Python {m['python']}; "
        f"OMP_NUM_THREADS={m['env'].get('OMP_NUM_THREADS')}, OMP_WAIT_POLICY={m['env'].get('OMP_WAIT_POLICY')}, "
        f"GOMP_SPINCOUNT={m['env'].get('GOMP_SPINCOUNT')}; "
        f"git {m.get('git_commit')}",
        f"- Command: `{' '.join(result['command'])}`",
        f"- Repeats {result['spec']['repeats']} after {result['spec']['warmup']} warm-up; times are medians "
        "in seconds, IQR = interquartile range. `cells` = cells per 512x512 pixels (boxes supplied), or for a "
        "real-image scene its name (the model's own CellFinder finds the cells).",
        "",
        "## End to end",
        "",
    ]
    rows = []
    for r in result["runs"]:
        e = r["end_to_end"]
        rows.append([_pipe(r), r["model"], _size(r), _cells(r), str(r["n_cells"]), r["precision"],
                     _window(r), r["device"], str(r["tiles"] or "-"), _s(e["median"]), _s(e["iqr"]),
                     f"{_s(e['min'])}-{_s(e['max'])}", _gib(r["memory"]["peak_rss_bytes"]), _rise(r["memory"]),
                     _gib(r["memory"]["peak_gpu_allocated_bytes"]), _s(r["tiles_per_s"], 2),
                     _s(r["megapixels_per_s"], 3), str(r["cells_found"])])
    header = ["pipeline", "model", "size", "cells", "N", "precision", "window", "device", "tiles", "median s", "IQR s",
              "min-max s", "peak RSS GiB", "RSS rise GiB", "peak GPU GiB", "tiles/s", "MP/s", "found"]
    out.append(_table(header, rows))
    stages: list[str] = []
    for r in result["runs"]:
        stages += [s for s in r["stages"] if s not in stages]
    out += ["", "## Stages (median seconds; 'other' = end to end minus the named stages)", ""]
    rows = [[_pipe(r), r["model"], _size(r), _cells(r), r["precision"], _window(r)]
            + [_s(r["stages"][s]["median"]) if s in r["stages"] else "" for s in stages] for r in result["runs"]]
    out.append(_table(["pipeline", "model", "size", "cells", "precision", "window", *stages], rows))
    comps = [c for c in result.get("comparisons", []) if c["reference_s"] or c["cellpose_s"]]
    if comps:
        out += ["", "## Ours vs reference structure vs Cellpose 3 (ratio > 1: ours is faster)", ""]
        rows = [[c["model"], "x".join(map(str, c["size"])), _cells(c), c["precision"],
                 _window({"pipeline": "cellsam", **c}), _s(c["ours_s"]),
                 _s(c["reference_s"]), _s(c["speedup_vs_reference"], 2), _s(c["cellpose_s"]),
                 _cp_diameter(c.get("cellpose_diameter")), _s(c["speedup_vs_cellpose"], 2)] for c in comps]
        out.append(_table(["model", "size", "cells", "ours precision", "window", "ours s", "reference s (fp32)",
                           "reference / ours", "cellpose s", "cellpose diameter", "cellpose / ours"], rows))
    if result.get("busy"):
        n = result["busy"][0]["neighbours"]
        out += ["", f"## Beside {n} busy process(es) (busy / quiet > 1: slower when other work shares the CPU)", "",
                f"Each configuration timed twice in this run: quiet, then beside {n} processes that each keep a "
                f"core busy; OMP_WAIT_POLICY={m['env'].get('OMP_WAIT_POLICY')}, "
                f"GOMP_SPINCOUNT={m['env'].get('GOMP_SPINCOUNT')}.", ""]
        rows = [[b["pipeline"], b["model"], "x".join(map(str, b["size"])), _cells(b), b["precision"],
                 _window(b), _s(b["quiet_s"]), _s(b["busy_s"]), _s(b["slowdown"], 2)] for b in result["busy"]]
        out.append(_table(["pipeline", "model", "size", "cells", "precision", "window", "quiet s", "busy s",
                           "busy / quiet"], rows))
    if result.get("parity"):
        out += ["", "## Mask parity: our batched decoder vs the reference per-box loop (identical boxes)", ""]
        rows = []
        for p in result["parity"]:
            se, oe = p["same_embedding"], p["own_encoders"]
            rows.append([p["model"], p["precision"], str(p["n_boxes"]), _fmt_e(p["embedding_max_abs_diff"]),
                         _fmt_e(p["logit_max_abs_diff"]), "yes" if se["identical"] else "no",
                         f"{se['pixels_differing']}/{se['pixels_total']}", _s(se["min_iou"], 4),
                         f"{oe['pixels_differing']}/{oe['pixels_total']}", _s(oe["min_iou"], 4)])
        out.append(_table(["model", "ours precision", "boxes", "embedding max diff", "logit max diff",
                           "identical (same embedding)", "pixels differing", "min IoU",
                           "pixels differing (own encoders)", "min IoU (own encoders)"], rows))
    if result.get("models"):
        out += ["", "## Models", ""]
        out += [f"- `{k}`: variant {v['variant']}, {v['parameters'] / 1e6:.1f} M parameters, tile {v['tile_size']} "
                f"-> input {v['model_side']}" + (", RANDOM weights" if v["random_weights"] else "")
                for k, v in result["models"].items()]
    if result.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(out) + "\n"


def _fmt_e(x: float) -> str:
    return f"{x:.2e}"


def write_report(
    result: dict[str, Any], out: str | Path, *, plot: bool = True,
    render: Callable[[dict[str, Any]], str] = render_markdown,
) -> list[Path]:
    """Write ``out.json`` and ``out.md`` (and ``out.png`` when ``plot`` and matplotlib is available).

    ``out`` is a path stem such as ``benchmarks/cpu_2core``; a ``.json``/``.md`` suffix is dropped.
    ``render`` turns the result into the markdown (another for ``cellsam bench --prompts``).
    """
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(f"{stem}.json"), Path(f"{stem}.md")]
    paths[0].write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    paths[1].write_text(render(result))
    if plot:
        png = plot_scaling(result, Path(f"{stem}.png"))
        if png is not None:
            paths.append(png)
    return paths


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _pipe(r: dict[str, Any]) -> str:
    """The pipeline column: its name, and for a run beside busy neighbours their number."""
    n = r.get("neighbours") or 0
    return r["pipeline"] + (f" (+{n} busy)" if n else "")


def _cp_diameter(d: float | None) -> str:
    """Cellpose's ``diameter`` argument: "-" for none (the image as it is)."""
    return "-" if d is None else f"{d:.1f}"


def _window(r: dict[str, Any]) -> str:
    """The decoder window of one of our runs ("whole": whole frames, also for records before windows);
    for Cellpose its ``diameter`` ("d=9.4") or "-"."""
    if r["pipeline"] == "cellpose" and r.get("diameter") is not None:
        return f"d={_cp_diameter(r['diameter'])}"
    if r["pipeline"] != "cellsam":
        return "-"
    w = r.get("decode_window")
    text = "whole" if w is None else f"{w:g}x"
    d = r.get("diameter")
    if d is not None:  # the scale: "auto" (what the size model estimated) or a given diameter
        used = r.get("diameter_used")
        text += f", d={d if isinstance(d, str) else f'{d:g}'}"
        text += f" ({used:.0f} px)" if isinstance(used, float) else ""
    return text


def plot_scaling(result: dict[str, Any], path: Path) -> Path | None:
    """Two panels: end-to-end time vs cells (at each size) and vs image area (at each cell density),
    one line per pipeline/model/precision. None when matplotlib is missing or nothing varies."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [r for r in result["runs"] if not r.get("neighbours")]  # the quiet pass
    series: dict[tuple, list[tuple[float, float, int]]] = {}
    names: dict[float, str] = {}
    for r in runs:
        area = r["size"][0] * r["size"][1] / 1e6
        names[area] = _size(r)
        series.setdefault((r["pipeline"], r["model"], f"{r['precision']} {_window(r)}".strip(" -")), []).append(
            (area, r["end_to_end"]["median"], r["cells"]))
    if len({r["cells"] for r in runs}) < 2 and len({tuple(r["size"]) for r in runs}) < 2:
        return None
    fig, (ax_c, ax_a) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (pipe, model, prec), pts in sorted(series.items()):
        label = f"{pipe} {model} {prec}"
        for area in sorted({p[0] for p in pts}):
            by_cells = sorted((c, t) for a, t, c in pts if a == area)
            if len(by_cells) > 1:
                ax_c.plot([c for c, _ in by_cells], [t for _, t in by_cells], marker="o",
                          label=f"{label} {names[area]}")
        for cells in sorted({p[2] for p in pts}):
            by_area = sorted((a, t) for a, t, c in pts if c == cells)
            if len(by_area) > 1:
                ax_a.plot([a for a, _ in by_area], [t for _, t in by_area], marker="o",
                          label=f"{label} {cells} cells/512²")
    for ax, xl in ((ax_c, "cells per 512x512"), (ax_a, "image area (megapixels)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("end to end, median s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle(f"cellsam bench: {result['machine']['cpu']} / {result['machine']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cells(r: dict) -> str:
    """The density column: cells per 512^2, and the scene's name for real images."""
    scene = r.get("scene", "synthetic")
    return str(r["cells"]) if scene == "synthetic" else f"{r['cells']} ({scene}, real)"
