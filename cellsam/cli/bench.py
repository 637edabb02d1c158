"""``cellsam bench``: time the segmentation pipeline per stage; optionally the reference design and Cellpose.

Writes ``OUT.json`` (all measurements), ``OUT.md`` (tables) and ``OUT.png`` (scaling plot, when
matplotlib is installed and sizes or cell counts vary). ``--prompts`` instead times single point and
box prompts on an image whose embedding is cached (the labeling server's path; :mod:`cellsam.bench.prompts`).
``--busy-neighbour N`` times everything a second time beside N CPU-burning processes and reports busy / quiet
(:mod:`cellsam.bench.busy`). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from cellsam.cli.segment import diameter_arg
from cellsam.config import DEFAULT_DECODE_WINDOW

log = logging.getLogger(__name__)


def _chunk(value: str) -> int | None:
    """``--decode-chunk``: a positive integer, or "auto" (None)."""
    if value == "auto":
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--decode-chunk must be >= 1 or 'auto', got {value}")
    return n


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``cellsam`` command."""
    p = subparsers.add_parser(
        "bench",
        help="time the pipeline stage by stage (and the reference design / Cellpose)",
        description="Time read, normalise, encoder, CellFinder, mask decoder, postprocess, stitching and merge "
        "on synthetic images with a chosen number of cells (boxes supplied). Run on a quiet machine "
        "(cellsam sets OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=10000 unless the environment sets "
        "OMP_WAIT_POLICY); --busy-neighbour N adds a pass "
        "beside N busy processes.",
    )
    p.add_argument("--model", nargs="+", default=["default"],
                   help="weights name, checkpoint path or architecture variant (random weights); several allowed "
                        "(default: 'default', random vit_cpu weights when none are registered)")
    p.add_argument("--sizes", nargs="+", type=int, default=[512], help="image sides in pixels (default 512)")
    p.add_argument("--cells", nargs="+", type=int, default=[10, 100, 500],
                   help="cells per 512x512 pixels (default 10 100 500)")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"],
                   help="fp32 and/or bf16 autocast for our pipeline (default fp32)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per configuration (default 3; with --prompts: prompts of each kind, default 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1; with --prompts 5)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps or auto (default auto)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--reference", nargs="*", default=None, metavar="MODEL",
                   help="also time the reference design (2 encoder passes, per-box decoding) built from "
                        "segment_anything with the same weights, at the model's tile size; without names: "
                        "for every --model")
    p.add_argument("--no-parity", dest="parity", action="store_false",
                   help="skip the mask-parity check that --reference runs")
    p.add_argument("--cellpose", action="store_true",
                   help="also time Cellpose 3 (network + mask building); on real scenes with --diameter auto "
                        "(or N) also Cellpose given the scene's true median cell diameter, beside those runs")
    p.add_argument("--cellpose-path", default=None,
                   help="folder with Cellpose 3 installed by pip --target (put first on sys.path)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per encoder pass (default 4)")
    p.add_argument("--decode-chunk", type=_chunk, default=None, metavar="N|auto",
                   help="boxes per mask-decoder call (default auto: the model's auto_chunk_size)")
    p.add_argument("--decode-window", nargs="+", type=float, default=[DEFAULT_DECODE_WINDOW], metavar="X",
                   help="decoder token window per box, x its longer side; several: one run each, for an A/B in "
                   f"one run (default {DEFAULT_DECODE_WINDOW:g}; 0: whole frames)")
    p.add_argument("--diameter", nargs="+", type=diameter_arg, default=["none"], metavar="auto|none|N",
                   help="cellsam.segment's diameter for the --real scenes; several: one run each (default none)")
    p.add_argument("--clip-masks", choices=("auto", "on", "off"), default="auto",
                   help="clip decoder logits to the boxes (auto: only for random weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes and random weights")
    p.add_argument("--real", nargs="+", default=[], choices=("dense512", "mosaic2048"), metavar="SCENE",
                   help="also time real-image scenes with the model's own CellFinder: dense512 (the densest "
                        "512x512 DSB crop), mosaic2048 (a 2048x2048 mosaic of DSB images); needs --real-data")
    p.add_argument("--real-data", default=None, metavar="DIR",
                   help="the DSB 2018 folder the real scenes come from (e.g. ../shared/data/dsb2018)")
    p.add_argument("--busy-neighbour", "--busy-neighbours", dest="busy_neighbours", type=int, default=0,
                   metavar="N",
                   help="time everything a second time beside N processes that each keep a core busy, and report "
                        "busy / quiet per configuration (the cost of sharing the CPU under the thread policy in "
                        "force, OMP_WAIT_POLICY; default 0: quiet only)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write OUT.png")
    p.add_argument("--out", type=Path, default=None,
                   help="output path stem: writes OUT.json and OUT.md (default benchmarks/bench; with --prompts "
                        "benchmarks/prompts)")
    g = p.add_argument_group("prompt latency (--prompts)")
    g.add_argument("--prompts", action="store_true",
                   help="time point and box prompts on an image whose tiles are embedded (the labeling server's "
                        "path: HTTP route, server model call, Predictor.predict) instead of the pipeline; uses the "
                        "first --model, --repeats, --warmup, --device, --threads, --seed")
    g.add_argument("--image", type=Path, default=None, help="image for --prompts (default: the bundled sample)")
    g.add_argument("--budget-ms", type=float, default=100.0, help="latency budget reported by --prompts (default 100)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from cellsam.bench.report import write_report
    from cellsam.bench.research import ResearchCodeMissing
    from cellsam.bench.suite import BenchSpec, run_suite

    if args.threads is not None:
        if args.threads < 1:
            log.error("--threads must be >= 1, got %d", args.threads)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log.warning("OMP_WAIT_POLICY is not PASSIVE: on a shared CPU, spinning OpenMP threads can make small "
                    "kernels much slower; export OMP_WAIT_POLICY=PASSIVE before starting Python")
    if args.busy_neighbours < 0:
        log.error("--busy-neighbour must be >= 0, got %d", args.busy_neighbours)
        return 2
    if args.prompts:
        if args.busy_neighbours:
            log.error("--busy-neighbour times the pipeline; it does not apply to --prompts")
            return 2
        return _run_prompts(args)
    args.repeats = 3 if args.repeats is None else args.repeats
    args.warmup = 1 if args.warmup is None else args.warmup
    args.out = Path("benchmarks") / "bench" if args.out is None else args.out
    spec = BenchSpec(
        models=list(args.model), sizes=list(args.sizes), cells=list(args.cells), precisions=list(args.precision),
        device=args.device, repeats=args.repeats, warmup=args.warmup,
        reference=None if args.reference is None else list(args.reference), parity=args.parity,
        cellpose=args.cellpose, cellpose_path=args.cellpose_path, batch_size=args.batch_size,
        decode_chunk=args.decode_chunk, decode_windows=list(args.decode_window), clip_masks=args.clip_masks,
        seed=args.seed, real=list(args.real), real_data=args.real_data, busy_neighbours=args.busy_neighbours,
        diameters=[None if d == "none" else d for d in args.diameter],
    )
    try:
        spec.validate()
        result = run_suite(spec, command=_command_line(args))
    except (ValueError, KeyError, FileNotFoundError, ResearchCodeMissing) as e:
        log.error("%s", e)
        return 2
    for path in write_report(result, args.out, plot=args.plot):
        print(path)
    return 0


def _run_prompts(args: argparse.Namespace) -> int:
    from cellsam.bench.prompts import PromptBenchSpec, render_prompts_markdown, run_prompt_bench
    from cellsam.bench.report import write_report

    if args.reference is not None or args.cellpose:
        log.error("--prompts times the labeling server's prompt path; it takes no --reference or --cellpose")
        return 2
    if len(args.model) > 1:
        log.warning("--prompts times one model: %s (ignoring %s)", args.model[0], args.model[1:])
    spec = PromptBenchSpec(
        model=args.model[0], image=None if args.image is None else str(args.image),
        repeats=50 if args.repeats is None else args.repeats, warmup=5 if args.warmup is None else args.warmup,
        device=args.device, seed=args.seed, budget_ms=args.budget_ms,
    )
    out = Path("benchmarks") / "prompts" if args.out is None else args.out
    cmd = ["cellsam", "bench", "--prompts", "--model", spec.model, "--repeats", str(spec.repeats),
           "--warmup", str(spec.warmup), "--budget-ms", f"{spec.budget_ms:g}", "--seed", str(spec.seed)]
    cmd += (["--image", spec.image] if spec.image else []) + (["--device", args.device] if args.device else [])
    cmd += (["--threads", str(args.threads)] if args.threads else []) + ["--out", str(out)]
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per in-process request otherwise
    try:
        result = run_prompt_bench(spec, command=cmd)
    except (ValueError, KeyError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    for path in write_report(result, out, plot=False, render=render_prompts_markdown):
        print(path)
    for r in result["runs"]:
        s = r["seconds"]
        if not r["n"]:
            log.info("%-11s %-5s no prompt made a cell (%d failed)", r["path"], r["prompt"], r["failed"])
            continue
        log.info("%-11s %-5s median %.1f ms (IQR %.1f, max %.1f), n=%d", r["path"], r["prompt"], s["median"] * 1e3,
                 s["iqr"] * 1e3, s["max"] * 1e3, r["n"])
    return 0


def _command_line(args: argparse.Namespace) -> list[str]:
    """The ``cellsam bench`` command equivalent to ``args`` (recorded in the report)."""
    cmd = ["cellsam", "bench", "--model", *args.model, "--sizes", *map(str, args.sizes),
           "--cells", *map(str, args.cells), "--precision", *args.precision,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.device:
        cmd += ["--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.reference is not None:
        cmd += ["--reference", *args.reference]
    if not args.parity:
        cmd.append("--no-parity")
    if args.cellpose:
        cmd.append("--cellpose")
    if args.cellpose_path:
        cmd += ["--cellpose-path", args.cellpose_path]
    cmd += ["--batch-size", str(args.batch_size), "--decode-chunk", str(args.decode_chunk or "auto"),
            "--decode-window", *(f"{w:g}" for w in args.decode_window),
            "--clip-masks", args.clip_masks, "--seed", str(args.seed)]
    if args.real:
        cmd += ["--real", *args.real, "--real-data", str(args.real_data), "--diameter",
                *(d if isinstance(d, str) else f"{d:g}" for d in args.diameter)]
    if args.busy_neighbours:
        cmd += ["--busy-neighbour", str(args.busy_neighbours)]
    return cmd + ["--out", str(args.out)]
