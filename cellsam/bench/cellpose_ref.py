"""Cellpose 3 inference timed on the same scenes (optional; imported lazily).

Cellpose 3.x pins ``numpy<2.1``, so it is not a dependency of cellsam. Install it beside the venv
without its dependencies and point ``path`` (``cellsam bench --cellpose-path``) or ``PYTHONPATH`` at it::

    .venv/bin/pip install --no-deps --target /tmp/cp3 cellpose==3.1.1.3 numba==0.68.1 llvmlite==0.50.0 \\
        fastremap fill_voids natsort opencv-python-headless roifile

What is timed (one image, ``CellposeModel.eval``'s path; without ``diameter`` no rescaling, with it Cellpose's
``resample`` path: the network on the image resized by ``diam_mean / diameter`` (30 / d), its flows resized
back, masks at the image's size with ``200 / rescale`` iterations):

    read          the same image file as our pipeline
    normalise     ``transforms.normalize_img`` (1st-99th percentile per channel)
    network       ``core.run_net``: CPnet (nbase 2-32-64-128-256, 6.6 M parameters, RANDOM weights; the
                  cost does not depend on them) over 224-pixel tiles with 10% overlap, batch 8
    masks         ``dynamics.resize_and_compute_masks`` (flow following, 200 iterations, flow-error check)

Random weights give meaningless flows, so the mask-building step is fed the *ideal* flows of the
scene's cells (``dynamics.masks_to_flows``, computed once outside the timing): it then builds the
scene's N masks, the work a trained model would cause.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellsam.bench.pipeline import Scene
from cellsam.bench.timing import PeakMemory, StageTimer, merge_peaks, summarize, synchronize

CP_STAGES = ("read", "normalise", "network", "masks")
CP_DIAM_MEAN = 30.0  # the cell diameter CPnet's models are trained at (Cellpose's diam_mean)
INSTALL_HINT = (
    ".venv/bin/pip install --no-deps --target /tmp/cp3 cellpose==3.1.1.3 numba==0.68.1 llvmlite==0.50.0 "
    "fastremap fill_voids natsort opencv-python-headless roifile; then --cellpose-path /tmp/cp3"
)


def import_cellpose(path: str | Path | None = None) -> tuple[Any | None, str]:
    """(the ``cellpose`` module or None, a message). ``path`` is put first on ``sys.path`` when given.

    Only Cellpose 3.x is accepted (Cellpose 4 replaced CPnet by a ViT-L).
    """
    if path is not None and str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        cp = importlib.import_module("cellpose")
        for sub in ("core", "dynamics", "transforms", "resnet_torch"):
            importlib.import_module(f"cellpose.{sub}")
    except Exception as e:  # ImportError, or numpy/numba binary mismatches raised at import
        return None, f"Cellpose 3 is not importable ({type(e).__name__}: {e}); install: {INSTALL_HINT}"
    try:
        from importlib.metadata import version

        ver = version("cellpose")
    except Exception:
        ver = "unknown"
    if not ver.startswith("3."):
        return None, f"Cellpose {ver} found; the benchmark times Cellpose 3.x (CPnet). Install: {INSTALL_HINT}"
    return cp, f"cellpose {ver}"


def _build_net(device: torch.device) -> Any:
    from cellpose import core
    from cellpose.resnet_torch import CPnet

    mkldnn = bool(core.check_mkl(True)) if device.type == "cpu" else False  # CellposeModel's CPU default
    net = CPnet([2, 32, 64, 128, 256], 3, sz=3, mkldnn=mkldnn, max_pool=True, diam_mean=CP_DIAM_MEAN)
    return net.to(device).eval()


def time_cellpose(
    scene: Scene,
    image_path: str | Path,
    *,
    repeats: int = 3,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    path: str | Path | None = None,
    diameter: float | None = None,
) -> dict[str, Any]:
    """Time Cellpose 3 on ``scene`` (read from ``image_path``); raises ``RuntimeError`` if not importable.

    ``diameter``: Cellpose's ``diameter`` argument (cells of d pixels are resized to 30, see the module
    docstring); None: the image as it is."""
    if diameter is not None and not (np.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be a positive number of pixels or None, got {diameter!r}")
    rescale = 1.0 if diameter is None else CP_DIAM_MEAN / float(diameter)
    if scene.labels is None:
        raise ValueError("Cellpose's mask-building step needs the scene's labels: synthetic_scene(keep_labels=True)")
    cp, message = import_cellpose(path)
    if cp is None:
        raise RuntimeError(message)
    from cellpose import core, dynamics, transforms

    from cellsam.io import load_image

    dev = torch.device(device)
    net = _build_net(dev)
    n_params = int(sum(p.numel() for p in net.parameters() if p.requires_grad))
    mu = dynamics.masks_to_flows(scene.labels.astype(np.int32), device=dev)  # (2, H, W) unit flows
    dp_ideal = (5.0 * mu).astype(np.float32)  # CPnet is trained on 5 x the unit flows
    prob_ideal = np.where(scene.labels > 0, 4.0, -4.0).astype(np.float32)
    timer, mem = StageTimer(dev), PeakMemory(dev)
    e2e, stages, mems, found = [], [], [], 0
    for i in range(warmup + repeats):
        timer.reset()
        mem.reset()
        synchronize(dev)
        t0 = time.perf_counter()
        with timer.stage("read"):
            raw = load_image(image_path).data
        with timer.stage("normalise"):
            x = np.stack([raw, np.zeros_like(raw)], axis=-1).astype(np.float32)  # (H, W, 2): cyto, nuclei
            x = transforms.normalize_img(x, normalize=True, norm3D=False)[np.newaxis]
        with timer.stage("network"), torch.inference_mode():
            yf, _ = core.run_net(net, x, batch_size=8, augment=False, tile_overlap=0.1, bsize=224,
                                 rsz=None if rescale == 1.0 else rescale)
            if rescale != 1.0:  # resample: the flows back at the image's size
                yf = transforms.resize_image(yf, x.shape[1], x.shape[2])
        with timer.stage("masks"):
            masks = dynamics.resize_and_compute_masks(
                dp_ideal, prob_ideal, niter=int(200 / rescale), cellprob_threshold=0.0, flow_threshold=0.4,
                interp=True,
                min_size=15, max_size_fraction=0.4, resize=None, device=dev,
            )
        synchronize(dev)
        total = time.perf_counter() - t0
        if i < warmup:
            continue
        per = {s: timer.seconds.get(s, 0.0) for s in CP_STAGES}
        per["other"] = max(total - sum(per.values()), 0.0)
        e2e.append(total)
        stages.append(per)
        mems.append(mem.peak())
        found = int(np.asarray(masks).max())
    med = float(np.median(e2e))
    h, w = scene.image.shape
    return {
        "pipeline": "cellpose",
        "model": "cellpose3",
        "model_detail": f"{message}, CPnet ({n_params / 1e6:.1f} M parameters, random weights)",
        "size": [int(h), int(w)],
        "cells": scene.cells,
        "n_cells": scene.n_cells,
        "scene": scene.name,
        "precision": "fp32",
        "device": str(dev),
        "repeats": int(repeats),
        "warmup": int(warmup),
        "tiles": None,
        "end_to_end": summarize(e2e),
        "stages": {s: summarize([p[s] for p in stages]) for s in (*CP_STAGES, "other")},
        "memory": merge_peaks(mems),
        "tiles_per_s": None,
        "megapixels_per_s": h * w / 1e6 / med if med > 0 else float("nan"),
        "cells_found": found,
        "diameter": None if diameter is None else float(diameter),
        "network_pixels": int(h * rescale) * int(w * rescale),  # run_net's resized image
    }
