"""One evaluation run over a data set (``cellsam evaluate --data``, ``cellsam benchmark``).

:func:`build_methods` turns the options (a model, baseline specs ``[NAME=]otsu|cellpose:PATH``, the prompt
study) into harness methods; :func:`evaluate_data` loads the images (:func:`~cellsam.eval.harness.load_data`,
optionally only some sources), runs every method (:func:`~cellsam.eval.harness.evaluate_methods`) and
returns the report with the label images it kept for plots; :func:`finish_report` adds the environment,
the arguments and the run time, as every report written by the command line holds them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.config import DEFAULT_DECODE_WINDOW, FlipTest, flip_test_mode
from cellsam.eval.harness import EvalItem, InputError, Method, environment, evaluate_methods, load_data
from cellsam.inference.params import DEFAULT_MIN_AREA_REL

__all__ = ["baseline_spec", "build_methods", "data_plots", "evaluate_data", "finish_report", "folder_plots"]


def baseline_spec(spec: str) -> tuple[str, str, str]:
    """``[NAME=]KIND[:ARG]`` -> (method name, kind, arg); the name defaults to the kind."""
    head, eq, rest = spec.partition("=")
    if eq and head and ":" not in head and "/" not in head:
        name, spec = head, rest
    else:
        name = ""
    kind, _, arg = spec.partition(":")
    return name or kind, kind, arg


def build_methods(*, model: str | None = None, baselines: Sequence[str] = (), prompt_study: bool = False,
                  device: str = "auto", precision: str = "fp32", box_threshold: float | None = None,
                  box_threshold_rel: float | None = None, iou_threshold: float | None = None,
                  mask_threshold: float | None = None, min_area_rel: float = DEFAULT_MIN_AREA_REL,
                  tile_size: int | None = None, decode_copies: bool = False,
                  decode_window: float = DEFAULT_DECODE_WINDOW,
                  flip_test: FlipTest | bool | None = None) -> tuple[dict[str, Method], dict[str, Any]]:
    """The methods of one run and their settings (for the report).

    Args:
        model: weights name or checkpoint (None: ``"default"``; ``"none"``: no model).
        baselines: ``[NAME=]otsu`` or ``[NAME=]cellpose:MODEL_FILE`` specs.
        prompt_study: also the model's masks from ground-truth box and point prompts.
        box_threshold, box_threshold_rel, iou_threshold, mask_threshold, flip_test: None = the model's own.
        min_area_rel: as :func:`cellsam.segment`'s.
    Raises:
        InputError: an unknown or repeated baseline, a prompt study without a model, or no method at all.
    """
    from cellsam.eval import baselines as base
    from cellsam.eval.harness import cellsam_method

    methods: dict[str, Method] = {}
    settings: dict[str, Any] = {}
    model_name = model if model is not None else "default"
    if model_name.lower() != "none":
        from cellsam.inference.runtime import resolve_model

        net, _ = resolve_model(model_name, device)
        inf = net.cfg.inference  # the model's own thresholds unless given
        kw = dict(box_threshold=inf.box_threshold if box_threshold is None else box_threshold,
                  box_threshold_rel=inf.box_threshold_rel if box_threshold_rel is None else box_threshold_rel,
                  iou_threshold=inf.iou_threshold if iou_threshold is None else iou_threshold,
                  mask_threshold=inf.mask_threshold if mask_threshold is None else mask_threshold,
                  min_area_rel=min_area_rel, tile_size=tile_size, precision=precision, decode_copies=decode_copies,
                  decode_window=decode_window,
                  flip_test=flip_test_mode(inf.flip_test if flip_test is None else flip_test))
        methods["cellsam"] = cellsam_method(net, **kw)
        settings["cellsam"] = {"model": model_name, **kw, "stain_grey": inf.stain_grey}
        if prompt_study:
            from cellsam.eval.prompts import prompt_method

            for prompt in ("box", "point"):
                methods[f"prompt:{prompt}"] = prompt_method(net, prompt, mask_threshold=kw["mask_threshold"],
                                                            tile_size=tile_size)
            settings["prompt_study"] = "ground-truth prompts, one per cell; masks scored by predicted IoU"
    elif prompt_study:
        raise InputError("--prompt-study needs a model (not --model none)")
    for spec in baselines:
        name, kind, arg = baseline_spec(spec)
        if name in methods:
            raise InputError(f"--baseline {spec!r}: a method named {name!r} is already evaluated; name this one "
                             f"with NAME={kind}{':' + arg if arg else ''}")
        if kind == "otsu" and not arg:
            methods[name] = base.otsu_method()
            settings[name] = "Otsu on the blue channel + distance-transform watershed"
        elif kind == "cellpose" and arg:
            methods[name] = base.cellpose_method(Path(arg), device="cpu" if device == "auto" else device)
            settings[name] = {"model": arg}
            record = Path(arg).parent.parent / f"{Path(arg).name}.json"
            if record.is_file():
                settings[name]["training"] = json.loads(record.read_text())
        else:
            raise InputError(f"unknown --baseline {spec!r}: use 'otsu' or 'cellpose:MODEL_FILE', optionally "
                             "as NAME=otsu / NAME=cellpose:MODEL_FILE")
    if not methods:
        raise InputError("nothing to evaluate: give --model and/or --baseline")
    return methods, settings


def evaluate_data(data: str | Path, split: str = "val", *, sources: Sequence[str] = (), limit: int | None = None,
                  progress: bool = False, **method_options: Any
                  ) -> tuple[dict, list[EvalItem], dict[str, dict[int, np.ndarray]]]:
    """Every method of :func:`build_methods` (``method_options``) on the full images of ``split`` of a prepared
    set or annotated folder (only ``sources``' images when given; the first ``limit``).

    Returns:
        the harness report (``mode``, ``data``, ``split``, ``settings`` added), the items and, per method,
        the label image of each item index (for :func:`data_plots`).
    """
    methods, settings = build_methods(**method_options)
    stain = settings["cellsam"]["stain_grey"] if "cellsam" in settings else None
    items = load_data(data, split, limit=None if sources else limit, stain=stain)
    if sources:
        from cellsam.data.splits import select_sources

        items = [items[i] for i in select_sources([it.source for it in items], include=list(sources))]
        items = items[:limit] if limit is not None else items
    kept: dict[str, dict[int, np.ndarray]] = {m: {} for m in methods}
    index = {id(it): i for i, it in enumerate(items)}

    def keep(method: str, item: Any, gt: Any, pred: Any) -> None:
        kept[method][index[id(item)]] = pred.labels

    report = evaluate_methods(items, methods, progress=progress, keep=keep)
    report.update(mode="data", data=str(data), split=split, settings=settings)
    return report, items, kept


def finish_report(report: dict, arguments: dict[str, Any], started: float) -> dict:
    """Add ``environment``, the command's ``arguments`` (JSON-able) and ``seconds`` since ``started``."""
    report["environment"] = environment()
    report["arguments"] = {k: (list(v) if isinstance(v, tuple) else v
                               if isinstance(v, (int, float, bool, list)) or v is None else str(v))
                           for k, v in arguments.items() if k != "func"}
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def data_plots(report: dict, items: list[EvalItem], kept: dict[str, dict[int, np.ndarray]], outdir: Path,
               k: int) -> list[Path]:
    """``f1_by_data_type.png`` and, per method, ``worst_<method>.png`` (its ``k`` worst images)."""
    from cellsam.eval.plots import Example, plot_examples, plot_f1_by_data_type, worst_images

    paths = [plot_f1_by_data_type(report, outdir / "f1_by_data_type.png")]
    for name, res in report["methods"].items():
        ex = []
        for i in worst_images(report, name, k):
            image, gt = items[i].load()
            ex.append(Example(items[i].name, image, gt, kept[name][i], float(res["per_image"][i]["deepcell"]["f1"])))
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        paths.append(plot_examples(ex, outdir / f"worst_{safe}.png", title=f"{name}: worst images"))
    return paths


def folder_plots(report: dict, arrays: dict[str, tuple[np.ndarray, np.ndarray]], outdir: Path,
                 k: int) -> list[Path]:
    """The plots of a :func:`~cellsam.eval.folders.evaluate_folders` report (no images: blank backgrounds)."""
    from cellsam.eval.plots import Example, plot_examples, plot_f1_by_data_type, worst_images

    rows = report["methods"]["pred"]["per_image"]
    names = list(arrays)
    ex = [Example(names[i], np.zeros((3, *arrays[names[i]][0].shape), np.float32), *arrays[names[i]],
                  float(rows[i]["deepcell"]["f1"])) for i in worst_images(report, "pred", k)]
    return [plot_f1_by_data_type(report, outdir / "f1_by_data_type.png"),
            plot_examples(ex, outdir / "worst_pred.png")]
