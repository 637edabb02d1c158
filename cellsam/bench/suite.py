"""A whole benchmark run: models x image sizes x cell counts x precisions x decode windows, plus reference
and Cellpose.

:func:`run_suite` returns the JSON-serialisable result written by :mod:`.report` (schema
``cellsam-bench/1``, documented in ``benchmarks/README.md``).
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cellsam.bench.pipeline import synthetic_scene, time_pipeline, write_scene
from cellsam.bench.research import load_research
from cellsam.config import DEFAULT_DECODE_WINDOW, check_decode_window, check_diameter

log = logging.getLogger(__name__)
SCHEMA = "cellsam-bench/1"
PRECISIONS = ("fp32", "bf16")


@dataclass
class BenchSpec:
    """What to run. ``reference``: None = no reference; empty = for every model; else those model names."""

    models: list[str] = field(default_factory=lambda: ["default"])
    sizes: list[int] = field(default_factory=lambda: [512])
    cells: list[int] = field(default_factory=lambda: [10, 100, 500])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    device: str | None = None
    repeats: int = 3
    warmup: int = 1
    reference: list[str] | None = None
    parity: bool = True
    cellpose: bool = False
    cellpose_path: str | None = None
    batch_size: int = 4
    decode_chunk: int | None = None  # None: the model's auto_chunk_size
    decode_windows: list[float | None] = field(default_factory=lambda: [DEFAULT_DECODE_WINDOW])  # None/0: whole
    clip_masks: str = "auto"  # auto: on for random weights
    seed: int = 0
    # real-image scenes (cellsam.bench.real.REAL_SCENES) timed with the model's own CellFinder, built
    # from the DSB 2018 folder ``real_data``
    real: list[str] = field(default_factory=list)
    real_data: str | None = None
    # cellsam.segment's diameter for the real scenes (None: the image's own scale; "auto": the size
    # model); several: one run each, so the time auto-scaling adds is an A/B in one run
    diameters: list[float | str | None] = field(default_factory=lambda: [None])
    # a second pass of every timing beside this many CPU-burning processes (cellsam.bench.busy); 0: none
    busy_neighbours: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if not self.models:
            raise ValueError("give at least one model")
        if not self.sizes or min(self.sizes) < 16:
            raise ValueError(f"sizes must be >= 16 pixels, got {self.sizes}")
        if not self.cells or min(self.cells) < 1:
            raise ValueError(f"cells must be >= 1, got {self.cells}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(f"precisions must be among {PRECISIONS}, got {self.precisions}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {self.repeats}, {self.warmup}")
        if self.batch_size < 1 or (self.decode_chunk is not None and self.decode_chunk < 1):
            raise ValueError(f"batch_size and decode_chunk must be >= 1, got {self.batch_size}, {self.decode_chunk}")
        if not self.decode_windows:
            raise ValueError("give at least one decode window (0: whole frames)")
        for w in self.decode_windows:
            check_decode_window(w)  # time_pipeline reads 0 as None (whole frames)
        if not self.diameters:
            raise ValueError("give at least one diameter (none: the image's own scale)")
        for d in self.diameters:
            check_diameter(d)
        if self.clip_masks not in ("auto", "on", "off"):
            raise ValueError(f"clip_masks must be auto, on or off, got {self.clip_masks!r}")
        from cellsam.bench.real import REAL_SCENES

        bad_real = sorted(set(self.real) - set(REAL_SCENES))
        if bad_real:
            raise ValueError(f"real scenes must be among {REAL_SCENES}, got {bad_real}")
        if self.real and not self.real_data:
            raise ValueError("real scenes need the DSB 2018 folder (--real-data, e.g. ../shared/data/dsb2018)")
        if isinstance(self.busy_neighbours, bool) or not isinstance(self.busy_neighbours, int) \
                or self.busy_neighbours < 0:
            raise ValueError(f"busy_neighbours must be an integer >= 0, got {self.busy_neighbours!r}")
        unknown = sorted(set(self.reference or []) - set(self.models))
        if unknown:
            raise ValueError(f"reference models {unknown} are not among --model {self.models}")


def resolve_bench_model(name: str, device: torch.device, *, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode on ``device``, info). ``"default"`` falls back to random ``vit_cpu`` weights
    when no default weights are registered; a variant name gives random weights; else a file / weights name.
    """
    from cellsam.models.build import build_model
    from cellsam.registry import list_variants
    from cellsam.weights import load_model, variant_of

    info: dict[str, Any] = {"name": name, "random_weights": False, "note": ""}
    if name in list_variants():
        torch.manual_seed(seed)
        net, info["random_weights"] = build_model(name), True
        info["note"] = f"architecture {name!r} with random weights"
    else:
        try:
            net = load_model(name)
        except KeyError as e:
            if name != "default":
                raise
            torch.manual_seed(seed)
            net, info["random_weights"] = build_model("vit_cpu"), True
            info["note"] = f"no 'default' weights registered ({e.args[0][:80]}...): random vit_cpu weights used"
    cfg = net.cfg
    info["variant"] = variant_of(cfg) or "custom"
    info["parameters"] = int(sum(p.numel() for p in net.parameters()))
    info["tile_size"], info["model_side"] = int(cfg.tile_size), int(cfg.encoder.img_size)
    return net.to(device).eval(), info


def _clip(spec: BenchSpec, info: dict[str, Any]) -> bool:
    return info["random_weights"] if spec.clip_masks == "auto" else spec.clip_masks == "on"


def run_suite(spec: BenchSpec, *, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every configuration of ``spec``; returns the result dict (see ``benchmarks/README.md``)."""
    from cellsam.bench.report import report_header
    from cellsam.inference.runtime import resolve_device

    spec.validate()
    dev = resolve_device(spec.device)
    notes: list[str] = []
    models = {}
    for name in spec.models:
        models[name] = resolve_bench_model(name, dev, seed=spec.seed)
        if models[name][1]["note"]:
            notes.append(f"{name}: {models[name][1]['note']}")
    refs = {}
    if spec.reference is not None:
        reference = load_research("reference_pipeline")  # benchmarks/: not installed with the package
        for name in spec.reference or spec.models:
            refs[name] = reference.ReferencePipeline(models[name][0])
    cp_ok = False
    if spec.cellpose:
        from cellsam.bench.cellpose_ref import import_cellpose

        mod, msg = import_cellpose(spec.cellpose_path)
        cp_ok = mod is not None
        if not cp_ok:
            notes.append(f"Cellpose skipped: {msg}")
    parity: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = _timing_pass(spec, models, refs, cp_ok, dev, tmp, notes, parity)
        if spec.busy_neighbours:
            from cellsam.bench.busy import busy_neighbours

            log.info("second pass beside %d busy process(es)", spec.busy_neighbours)
            with busy_neighbours(spec.busy_neighbours):
                busy = _timing_pass(spec, models, refs, cp_ok, dev, tmp, notes, None)
            runs += [{**r, "neighbours": spec.busy_neighbours} for r in busy]
    from cellsam.bench.busy import busy_comparisons

    return {
        **report_header(SCHEMA, spec, dev, command),
        "models": {name: info for name, (_, info) in models.items()},
        "runs": runs,
        "comparisons": comparisons([r for r in runs if not r.get("neighbours")]),
        "busy": busy_comparisons(runs),
        "parity": parity,
        "notes": sorted(set(notes)),
    }


def _timing_pass(spec: BenchSpec, models: dict[str, tuple[Any, dict[str, Any]]], refs: dict[str, Any],
                 cp_ok: bool, dev: torch.device, tmp: str, notes: list[str], parity: list[dict[str, Any]] | None
                 ) -> list[dict[str, Any]]:
    """Every timing of ``spec`` once (each run with ``neighbours`` 0); mask parity into ``parity`` unless
    it is None."""
    runs: list[dict[str, Any]] = []
    parity_done: set[str] = set()
    parity_cells = min(spec.cells, key=lambda c: abs(c - 100))
    for size in spec.sizes:
        for cells in spec.cells:
            scene = synthetic_scene(size, cells=cells, seed=spec.seed, keep_labels=cp_ok)
            path = write_scene(scene, tmp, f"scene_{size}_{cells}")
            for name, (net, info) in models.items():
                for prec, win in itertools.product(spec.precisions, spec.decode_windows):
                    r = time_pipeline(
                        net, scene, image_path=path, precision=prec, repeats=spec.repeats,
                        warmup=spec.warmup, batch_size=spec.batch_size, decode_chunk=spec.decode_chunk,
                        decode_window=win, clip_masks=_clip(spec, info), model_name=name,
                    )
                    runs.append(r)
                    _log_run(r)
                if name in refs and size == info["tile_size"]:
                    runs.append(_reference_run(refs[name], scene, path, spec, info, name))
                    _log_run(runs[-1])
                    if parity is not None and spec.parity and cells == parity_cells and name not in parity_done:
                        parity += _parity(net, refs[name], scene, spec, name)
                        parity_done.add(name)
                elif name in refs:
                    notes.append(f"reference for {name} runs only at size {info['tile_size']} (one tile); "
                                 f"skipped at {size}")
            if cp_ok:
                runs.append(_cellpose_run(scene, path, spec, dev, notes))
    runs += _real_runs(spec, models, dev, tmp, notes, cp_ok)
    return [{**r, "neighbours": 0} for r in runs]


def _cellpose_run(scene: Any, path: Path, spec: BenchSpec, dev: torch.device, notes: list[str],
                  diameter: float | None = None) -> dict[str, Any]:
    from cellsam.bench.cellpose_ref import time_cellpose

    r = time_cellpose(scene, path, repeats=spec.repeats, warmup=spec.warmup, device=dev, path=spec.cellpose_path,
                      diameter=diameter)
    notes.append(f"cellpose3: {r['model_detail']}; masks built from the ideal flows of the scene's cells (random "
                 "weights give meaningless flows)")
    if diameter is not None:
        notes.append(f"cellpose3 on {scene.name} with diameter={diameter:.1f} (the scene's true median cell "
                     "diameter, as a Cellpose user who knows it passes): the network sees the image resized by "
                     f"30 / d = {30 / diameter:.2f}; the row beside our diameter='auto' run")
    _log_run(r)
    return r


def _real_runs(spec: BenchSpec, models: dict[str, tuple[Any, dict[str, Any]]], dev: torch.device, tmp: str,
               notes: list[str], cp_ok: bool) -> list[dict[str, Any]]:
    """Each real scene: every model with its own CellFinder and stored thresholds, then Cellpose."""
    from cellsam.bench.real import real_scene

    runs: list[dict[str, Any]] = []
    for name in spec.real:
        assert spec.real_data is not None
        scene = real_scene(name, spec.real_data)
        path = write_scene(scene, tmp, f"real_{name}")
        notes.append(f"real scene {name}: {scene.n_cells} nuclei in {scene.image.shape[1]}x{scene.image.shape[0]} "
                     f"pixels from {spec.real_data}; our models use their own CellFinder and stored thresholds")
        for model, (net, _) in models.items():
            for prec, win, diam in itertools.product(spec.precisions, spec.decode_windows, spec.diameters):
                r = time_pipeline(net, scene, image_path=path, precision=prec, repeats=spec.repeats,
                                  warmup=spec.warmup, batch_size=spec.batch_size, decode_chunk=spec.decode_chunk,
                                  decode_window=win, clip_masks=False, model_name=model, own_boxes=True,
                                  diameter=diam)
                runs.append(r)
                _log_run(r)
        if cp_ok:
            runs.append(_cellpose_run(scene, path, spec, dev, notes))
            if any(d is not None for d in spec.diameters):  # Cellpose at the cells' scale too
                from cellsam.inference.scale import median_diameter

                true = median_diameter(scene.labels) if scene.labels is not None else None
                if true is not None:
                    runs.append(_cellpose_run(scene, path, spec, dev, notes, diameter=true))
    return runs


def _reference_run(ref: Any, scene: Any, path: Path, spec: BenchSpec, info: dict, name: str) -> dict[str, Any]:
    time_reference = load_research("reference_pipeline").time_reference
    return time_reference(ref, scene, path, repeats=spec.repeats, warmup=spec.warmup,
                          clip_masks=_clip(spec, info), model_name=name)


def _parity(net: Any, ref: Any, scene: Any, spec: BenchSpec, name: str) -> list[dict[str, Any]]:
    from cellsam.inference.preprocess import prepare_image

    parity_check = load_research("reference_pipeline").parity_check
    tile = prepare_image(scene.image)
    out = []
    for prec in spec.precisions:
        p = parity_check(net, ref, tile, scene.boxes, precision=prec, decode_chunk=spec.decode_chunk)
        out.append({"model": name, "cells": scene.cells, **p})
        log.info("parity %s %s: same embedding identical=%s min IoU %.4f; own encoders min IoU %.4f",
                 name, prec, p["same_embedding"]["identical"], p["same_embedding"]["min_iou"],
                 p["own_encoders"]["min_iou"])
    return out


def _log_run(r: dict[str, Any]) -> None:
    log.info("%-9s %-10s %5s %5d cells/512^2 %s window %s: %.3f s (IQR %.3f)", r["pipeline"], r["model"][:10],
             "x".join(map(str, r["size"])), r["cells"], r["precision"], r.get("decode_window"),
             r["end_to_end"]["median"], r["end_to_end"]["iqr"])


def comparisons(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run of ours: the reference (same model, size, cells; fp32) and Cellpose (same size, cells),
    with ratios ``reference / ours`` and ``cellpose / ours`` (> 1: ours is faster)."""
    def key(r: dict[str, Any]) -> tuple:
        return tuple(r["size"]), r["cells"], r.get("scene", "synthetic")

    refs = {(r["model"], *key(r)): r for r in runs if r["pipeline"] == "reference"}
    # Cellpose as it is beside our runs at the image's scale; given the cells' diameter beside our rescaled
    # ones (diameter "auto" or given), when it was timed so
    cps = {(*key(r), r.get("diameter") is not None): r for r in runs if r["pipeline"] == "cellpose"}
    out = []
    for r in runs:
        if r["pipeline"] != "cellsam":
            continue
        ours = r["end_to_end"]["median"]
        scaled = r.get("diameter") is not None
        ref, cp = refs.get((r["model"], *key(r))), cps.get((*key(r), scaled)) or cps.get((*key(r), False))
        ref_s = ref["end_to_end"]["median"] if ref else None
        cp_s = cp["end_to_end"]["median"] if cp else None
        out.append({
            "model": r["model"], "size": r["size"], "cells": r["cells"], "n_cells": r["n_cells"],
            "scene": r.get("scene", "synthetic"), "cells_found": r.get("cells_found"),
            "precision": r["precision"], "decode_window": r.get("decode_window"),
            "diameter": r.get("diameter"), "diameter_used": r.get("diameter_used"),
            "ours_s": ours, "reference_s": ref_s, "cellpose_s": cp_s,
            "cellpose_diameter": cp.get("diameter") if cp else None,
            "speedup_vs_reference": ref_s / ours if ref_s and ours > 0 else None,
            "speedup_vs_cellpose": cp_s / ours if cp_s and ours > 0 else None,
        })
    return out
