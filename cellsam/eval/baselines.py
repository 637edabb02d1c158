"""Baselines on prepared images (3, H, W) float32 in [0, 1] (R empty, G nuclear, B whole-cell).

**Classical floor** (:func:`otsu_watershed`): Otsu threshold of the blue (main) channel (bright
objects), small specks removed, then a watershed on the distance transform seeded by its local
maxima. No training, no parameters tuned per data set: every table gets a floor.

**Cellpose 3, trained from scratch** (``train_cellpose`` in ``scripts/train_cellpose_baseline.py``, research
code outside the package; :func:`cellpose_predict` here): Cellpose's
CPnet (6.6 M parameters, no downloaded weights) trained on the same prepared training tiles as CellSAM
with the paper's recipe (SPEC Appendix C): SGD (momentum 0.9), weight decay 1e-4, batch 8, lr 0.1 with
Cellpose's 10-epoch linear warm-up, channels [3, 2] (main = blue, second = green). The paper trains
300 epochs (lr halved every 5 epochs after epoch 250, which is what ``cellpose.train.train_seg`` does
for 100 < epochs <= 300); we scale the number of epochs, images per epoch and training tiles to a CPU-time
budget, and ``train_cellpose`` records the wall and CPU time it used in ``<out>/<name>.json`` so the
report can state it. Below 100 epochs Cellpose's schedule has no decay (warm-up, then constant lr).

Cellpose is imported lazily. Cellpose 3.1 pins ``numpy<2.1``; install it beside a numpy-2 environment
without its dependencies (see :data:`CELLPOSE_INSTALL`). ``cellpose.models``, ``train.train_seg`` and
``eval`` work that way with numpy 2.4 / torch 2.14 (checked at tiny scale).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from cellsam.data.splits import select_sources
from cellsam.eval.harness import Method, Prediction

__all__ = [
    "CELLPOSE_INSTALL", "otsu_watershed", "otsu_method", "require_cellpose", "load_training_tiles",
    "load_cellpose", "cellpose_predict", "cellpose_method",
]

CELLPOSE_INSTALL = (
    "pip install --no-deps --target /opt/cp3 cellpose==3.1.1.3 numba==0.68.1 llvmlite==0.50.0 fastremap "
    "fill_voids natsort opencv-python-headless roifile   # then: export PYTHONPATH=/opt/cp3"
)


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


def load_cellpose(model_path: str | Path, *, device: str = "cpu") -> Any:
    """A ``cellpose.models.CellposeModel`` from a file written by ``scripts/train_cellpose_baseline.py``."""
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
        model_path: a model file from ``scripts/train_cellpose_baseline.py``, or a model from :func:`load_cellpose`.
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
