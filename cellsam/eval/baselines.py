"""Baselines on prepared images (3, H, W) float32 in [0, 1] (R empty, G nuclear, B whole-cell).

**Classical floor** (:func:`otsu_watershed`): Otsu threshold of the blue (main) channel (bright
objects), small specks removed, then a watershed on the distance transform seeded by its local
maxima. No training, no parameters tuned per data set: every table gets a floor.

**Cellpose 3, trained from scratch** (:func:`train_cellpose`, :func:`cellpose_predict`): Cellpose's
CPnet (6.6 M parameters, no downloaded weights) trained on the same prepared training tiles as CellSAM
with the paper's recipe (SPEC Appendix C): SGD (momentum 0.9), weight decay 1e-4, batch 8, lr 0.1 with
Cellpose's 10-epoch linear warm-up, channels [3, 2] (main = blue, second = green). The paper trains
300 epochs (lr halved every 5 epochs after epoch 250, which is what ``cellpose.train.train_seg`` does
for 100 < epochs <= 300); we scale the number of epochs, images per epoch and training tiles to a CPU-time
budget, and :func:`train_cellpose` records the wall and CPU time it used in ``<out>/<name>.json`` so the
report can state it. Below 100 epochs Cellpose's schedule has no decay (warm-up, then constant lr).

Cellpose is imported lazily. Cellpose 3.1 pins ``numpy<2.1``; install it beside a numpy-2 environment
without its dependencies (see :data:`CELLPOSE_INSTALL`). ``cellpose.models``, ``train.train_seg`` and
``eval`` work that way with numpy 2.4 / torch 2.14 (checked at tiny scale).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cellsam.data.splits import select_sources
from cellsam.eval.harness import Method, Prediction

log = logging.getLogger(__name__)

__all__ = [
    "CELLPOSE_INSTALL", "otsu_watershed", "otsu_method", "require_cellpose", "load_training_tiles",
    "train_cellpose", "load_cellpose", "cellpose_predict", "cellpose_method",
]

CELLPOSE_INSTALL = (
    "pip install --no-deps --target /opt/cp3 cellpose==3.1.1.3 numba==0.68.1 llvmlite==0.50.0 fastremap "
    "fill_voids natsort opencv-python-headless roifile   # then: export PYTHONPATH=/opt/cp3"
)
PAPER_RECIPE = {"optimizer": "SGD", "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 8,
                "learning_rate": 0.1, "warmup_epochs": 10, "epochs": 300, "channels": [3, 2]}


def _check_prepared_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a prepared image (3, H, W) in [0, 1], got shape {image.shape}")
    return image


# ------------------------------------------------------------------------------------------ classical
def otsu_watershed(image: np.ndarray, *, channel: int = 2, min_area: int = 15, min_distance: int | None = None,
                   smooth: float = 1.0, invert: bool | str = False) -> np.ndarray:
    """Otsu threshold + distance-transform watershed.

    Args:
        image: (3, H, W) prepared image in [0, 1].
        channel: channel to threshold (2 = blue, the main channel; always non-empty in prepared data).
        min_area: objects (and foreground specks) under this many pixels are dropped.
        min_distance: minimum distance between seeds; None = half the median equivalent radius of the
            foreground's connected components (at least 2).
        smooth: Gaussian sigma applied to the channel before thresholding (0 = none).
        invert: True: objects are dark; "auto": the side of the threshold covering under half the image is
            foreground. Default False (bright objects): on our prepared val split "auto" lowered DSB's
            pooled DeepCell F1 from 0.68 to 0.62 (dark-nucleus bright-field images then give whole cells).

    Returns:
        (H, W) int32 labels 1..N (0 = background).
    """
    from skimage.filters import gaussian, threshold_otsu
    from skimage.segmentation import relabel_sequential, watershed

    x = _check_prepared_image(image)[channel].astype(np.float64)
    if smooth > 0:
        x = gaussian(x, sigma=smooth)
    if float(x.max()) - float(x.min()) < 1e-6:
        return np.zeros(x.shape, np.int32)
    if invert not in (True, False, "auto"):
        raise ValueError(f"invert must be True, False or 'auto', got {invert!r}")
    fg = x > threshold_otsu(x)
    if invert is True or (invert == "auto" and fg.mean() > 0.5):
        fg = ~fg
    comps, n = ndimage.label(fg)
    comps[np.bincount(comps.ravel())[comps] < min_area] = 0  # specks (background 0 stays 0)
    fg = ndimage.binary_fill_holes(comps > 0)
    comps, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(x.shape, np.int32)
    if min_distance is None:
        areas = np.bincount(comps.ravel())[1:]
        min_distance = max(2, int(round(0.5 * np.sqrt(np.median(areas) / np.pi))))
    dist = ndimage.distance_transform_edt(fg)
    dist = ndimage.gaussian_filter(dist, 1.0)
    from skimage.feature import peak_local_max

    peaks = peak_local_max(dist, min_distance=int(min_distance), labels=comps, exclude_border=False)
    markers = np.zeros(x.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components without a peak (flat plateaus) still get one seed
    seeded = np.unique(comps[markers > 0])
    for c in np.setdiff1d(np.arange(1, n + 1), seeded):
        ys, xs = np.nonzero(comps == c)
        k = int(np.argmax(dist[ys, xs]))
        markers[ys[k], xs[k]] = markers.max() + 1
    labels = watershed(-dist, markers, mask=fg)
    areas = np.bincount(labels.ravel())
    labels[areas[labels] < min_area] = 0
    return relabel_sequential(labels)[0].astype(np.int32)


def otsu_method(**kwargs: Any) -> Method:
    """:func:`otsu_watershed` as an evaluation method (see :mod:`cellsam.eval.harness`)."""

    def run(image: np.ndarray) -> Prediction:
        t0 = time.perf_counter()
        labels = otsu_watershed(image, **kwargs)
        return Prediction(labels, seconds=time.perf_counter() - t0)

    return run


# ------------------------------------------------------------------------------------------ Cellpose
def require_cellpose() -> Any:
    """Import cellpose 3.x, or raise ImportError saying how to install it next to numpy 2."""
    try:
        import cellpose
        from cellpose import models  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"the Cellpose baseline needs cellpose 3.x, which is not importable here ({e}). Cellpose 3.1 "
            f"pins numpy<2.1, so install it without its dependencies into a separate folder: {CELLPOSE_INSTALL}"
        ) from e
    major = str(getattr(cellpose, "version", "3")).split(".")[0]
    if major.isdigit() and int(major) != 3:
        raise ImportError(f"the Cellpose baseline needs cellpose 3.x (CPnet trained from scratch), found "
                          f"{cellpose.version}; {CELLPOSE_INSTALL}")
    return cellpose


def load_training_tiles(prepared_dir: str | Path, *, split: str = "train", max_tiles: int | None = None,
                        seed: int = 0, sources: tuple[str, ...] = (),
                        exclude_sources: tuple[str, ...] = ()) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Prepared tiles of a split as Cellpose training lists.

    ``sources`` / ``exclude_sources`` keep some sources only (:func:`cellsam.data.splits.select_sources`),
    before the ``max_tiles`` subset is drawn.

    Returns:
        images: list of (3, T, T) float32; labels: list of (T, T) int32; index: the tile indices used
        (a random subset without replacement when ``max_tiles`` is smaller than the tiles kept).
    """
    root = Path(prepared_dir)
    if not (root / "dataset.json").is_file():
        raise FileNotFoundError(f"{root} is not a prepared dataset (no dataset.json); run 'cellsam prepare'")
    if not (root / split / "images.npy").is_file():
        raise FileNotFoundError(f"{root / split / 'images.npy'} not found")
    images = np.load(root / split / "images.npy", mmap_mode="r")
    labels = np.load(root / split / "labels.npy", mmap_mode="r")
    n = len(images)
    if n == 0:
        raise ValueError(f"split {split!r} of {root} has no tiles")
    index = np.arange(n)
    if sources or exclude_sources:
        tiles = json.loads((root / split / "tiles.json").read_text())
        index = np.asarray(select_sources([t.get("source", "?") for t in tiles], include=sources,
                                          exclude=exclude_sources))
    if max_tiles is not None and max_tiles < len(index):
        if max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
        index = np.sort(np.random.default_rng(seed).choice(index, size=max_tiles, replace=False))
    return ([np.array(images[i], np.float32) for i in index], [np.array(labels[i, 0], np.int32) for i in index],
            [int(i) for i in index])


def train_cellpose(prepared_dir: str | Path, out: str | Path, *, epochs: int, nimg_per_epoch: int | None = None,
                   max_tiles: int | None = None, batch_size: int = 8, learning_rate: float = 0.1,
                   weight_decay: float = 1e-4, bsize: int = 224, min_train_masks: int = 1, seed: int = 0,
                   name: str = "cellpose_generalist", device: str = "cpu", save_every: int | None = None,
                   sources: tuple[str, ...] = (), exclude_sources: tuple[str, ...] = (),
                   init: str | Path | None = None) -> Path:
    """Train a Cellpose 3 CPnet on prepared training tiles, from scratch or from ``init``.

    Args:
        prepared_dir: ``cellsam prepare`` output; its ``train`` tiles are used.
        out: output folder; the model is saved as ``out/models/<name>`` and a record of the run (recipe,
            tiles, wall / CPU seconds, versions) as ``out/<name>.json``.
        epochs: Cellpose epochs (the paper: 300).
        nimg_per_epoch: images sampled per epoch (None = all tiles): with ``epochs`` it sets the number
            of optimiser steps, ``epochs * nimg_per_epoch / batch_size``.
        max_tiles: use a random subset of the training tiles (flows are computed for every tile used, up
            front, and all are held in memory: about 9 MB per 512-px tile).
        batch_size, learning_rate, weight_decay: the paper's recipe by default (SGD, momentum 0.9).
        bsize: crop size of the training patches (Cellpose default 224).
        min_train_masks: tiles with fewer cells are skipped by Cellpose.
        device: "cpu" or "cuda".
        save_every: also save the model every this many epochs, over the same file (None: only at
            the end), so a run cut short by its time budget leaves a usable model.
        sources, exclude_sources: train on some sources only (a specialist, a leave-one-source-out run).
        init: a model file from an earlier run to fine-tune (None: random weights, as the paper's
            from-scratch baseline). The warm-up and learning rate are the same either way.

    Returns:
        path of the saved model (pass it to :func:`cellpose_predict` or ``--baseline cellpose:PATH``).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if nimg_per_epoch is not None and nimg_per_epoch < 1:
        raise ValueError(f"nimg_per_epoch must be >= 1, got {nimg_per_epoch}")
    if save_every is not None and save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    if init is not None and not Path(init).is_file():
        raise FileNotFoundError(f"Cellpose model to start from not found: {init}")
    cellpose = require_cellpose()
    import torch
    from cellpose import models, train

    out = Path(out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    images, labels, index = load_training_tiles(prepared_dir, max_tiles=max_tiles, seed=seed, sources=sources,
                                                exclude_sources=exclude_sources)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = models.CellposeModel(gpu=device != "cpu", pretrained_model=str(init) if init is not None else False,
                                 device=torch.device(device))
    model_path, train_losses, _ = train.train_seg(
        model.net, train_data=images, train_labels=labels, channels=[3, 2], channel_axis=0,
        batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay, SGD=True,
        n_epochs=epochs, nimg_per_epoch=nimg_per_epoch, bsize=bsize, min_train_masks=min_train_masks,
        save_path=str(out), model_name=name, save_every=save_every or max(epochs, 1),
    )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n_used = nimg_per_epoch if nimg_per_epoch is not None else len(images)
    record = {
        "model": str(model_path),
        "prepared": str(Path(prepared_dir).resolve()),
        "tiles_available": int(len(np.load(Path(prepared_dir) / "train" / "images.npy", mmap_mode="r"))),
        "tiles_used": len(index),
        "sources": list(sources) or "all",
        "exclude_sources": list(exclude_sources),
        "init": str(init) if init is not None else None,
        "recipe": {"optimizer": "SGD", "momentum": 0.9, "weight_decay": weight_decay, "batch_size": batch_size,
                   "learning_rate": learning_rate, "warmup_epochs": 10, "epochs": epochs,
                   "nimg_per_epoch": n_used, "optimizer_steps": int(epochs * -(-n_used // batch_size)),
                   "bsize": bsize, "channels": [3, 2], "schedule": "cellpose.train.train_seg"},
        "paper_recipe": PAPER_RECIPE,
        "final_train_loss": float(train_losses[-1]) if len(train_losses) else None,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cellpose_version": str(getattr(cellpose, "version", "?")),
        "device": device,
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    log.info("Cellpose baseline: %s (%.0f s wall, %.0f s CPU)", model_path, wall, cpu)
    return Path(model_path)


def load_cellpose(model_path: str | Path, *, device: str = "cpu") -> Any:
    """A ``cellpose.models.CellposeModel`` from a file written by :func:`train_cellpose`."""
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"Cellpose model {path} not found")
    require_cellpose()
    import torch
    from cellpose import models

    return models.CellposeModel(gpu=device != "cpu", pretrained_model=str(path), device=torch.device(device))


def cellpose_predict(model_path: str | Path | Any, image: np.ndarray, *, diameter: float | None = None,
                     **eval_kwargs: Any) -> np.ndarray:
    """Segment one prepared image (3, H, W) with a trained Cellpose model.

    Args:
        model_path: a model file from :func:`train_cellpose`, or a model from :func:`load_cellpose`.
        diameter: cell diameter in pixels; None = the mean diameter of the training cells.
        eval_kwargs: passed to ``CellposeModel.eval`` (flow_threshold, cellprob_threshold, ...).

    Returns:
        (H, W) int32 labels.
    """
    image = _check_prepared_image(image)
    model = load_cellpose(model_path) if isinstance(model_path, (str, Path)) else model_path
    masks = model.eval(np.asarray(image, np.float32), channels=[3, 2], channel_axis=0, diameter=diameter,
                       **eval_kwargs)[0]
    return np.asarray(masks).astype(np.int32)


def cellpose_method(model_path: str | Path, *, device: str = "cpu", **eval_kwargs: Any) -> Method:
    """:func:`cellpose_predict` as an evaluation method (model loaded once; every mask scores 1.0)."""
    model = load_cellpose(model_path, device=device)

    def run(image: np.ndarray) -> Prediction:
        t0 = time.perf_counter()
        labels = cellpose_predict(model, image, **eval_kwargs)
        return Prediction(labels, seconds=time.perf_counter() - t0)

    return run
