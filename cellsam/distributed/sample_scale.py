"""The scale of a large image for ``diameter="auto"``, measured on a few windows of it.

``cellsam.segment``'s auto (:mod:`cellsam.inference.scale`) needs the whole normalised image, which a
blockwise run (Dask, napari's lazy images) never holds. Here the image's strided sample picks the
windows with the most signal (:func:`signal_windows`: up to :data:`SAMPLE_WINDOWS` of
:data:`WINDOW_SIDE` pixels) and each window is segmented with ``diameter="auto"`` exactly as
:func:`cellsam.segment` would segment it (the size model's scale, then the scale of its cells when they
ask for another). The image takes the scale at which half of the windows' cells were segmented
(:func:`weighted_median_scale`), so an image no larger than one window gets ``cellsam.segment``'s scale.
``polarity="auto"`` is decided on the same windows first (:func:`measure_polarity`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from cellsam.config import AUTO
from cellsam.distributed.source import ImageSource, Normalizer, Rect, prepare_window, sample_step

if TYPE_CHECKING:
    from cellsam.inference.params import SegmentParams

__all__ = ["SAMPLE_WINDOWS", "WINDOW_SIDE", "measure_polarity", "measure_scale", "signal_windows",
           "weighted_median_scale"]

WINDOW_SIDE = 1024
"""Side in pixels of a measured window (about 1,000 nuclei of 30 px fit in one)."""
SAMPLE_WINDOWS = 3
"""Windows measured per image: a few, so that one empty or unusual region does not set the scale."""


def signal_windows(signal: np.ndarray, step: int, shape: tuple[int, int], *, side: int = WINDOW_SIDE,
                   count: int = SAMPLE_WINDOWS) -> list[Rect]:
    """Up to ``count`` non-overlapping windows of ``side`` pixels with the highest mean signal.

    Args:
        signal: (h', w') the image's normalised signal (e.g. the brightest channel) sampled every
            ``step`` pixels (``h' = ceil(H / step)``).
        shape: the image's (H, W).
    Returns:
        windows ``(y0, x0, y1, x1)`` in image pixels, best first, on a grid of half-window steps (the
        whole image when it is no larger than one window); none where the signal is zero everywhere.
    """
    h, w = shape
    if not np.any(signal > 0):
        return []
    if h <= side and w <= side:
        return [(0, 0, h, w)]

    def starts(n: int) -> np.ndarray:
        return np.unique(np.r_[np.arange(0, max(n - side, 0), max(side // 2, 1)), max(n - side, 0)])

    candidates = [(int(y), int(x), min(int(y) + side, h), min(int(x) + side, w))
                  for y in starts(h) for x in starts(w)]
    scores = [float(signal[y0 // step : -(-y1 // step), x0 // step : -(-x1 // step)].mean())
              for y0, x0, y1, x1 in candidates]
    chosen: list[Rect] = []
    for k in np.argsort(scores, kind="stable")[::-1]:
        y0, x0, y1, x1 = candidates[int(k)]
        if scores[int(k)] <= 0 or len(chosen) == count:
            break
        if all(y1 <= a0 or y0 >= a1 or x1 <= b0 or x0 >= b1 for a0, b0, a1, b1 in chosen):
            chosen.append((y0, x0, y1, x1))
    return chosen


def measure_scale(net: Any, device: Any, source: ImageSource, norm: Normalizer, params: SegmentParams, *,
                  side: int = WINDOW_SIDE, count: int = SAMPLE_WINDOWS) -> tuple[int, float | None]:
    """The tile side to segment a large image at with ``diameter="auto"``, and its cells' diameter.

    Args:
        net, device: a loaded model in eval mode and its device.
        source, norm: the image and its global normalisation (:mod:`cellsam.distributed.source`).
        params: :class:`~cellsam.inference.params.SegmentParams` filled from the model (thresholds; its
            ``tile_size`` is the model's own).
    Returns:
        ``(tile_size, diameter)``: the model's own tile and None when the model has no cell diameter or
        the windows hold fewer than ``MIN_MEASURED_CELLS`` cells; else :func:`weighted_median_scale` of
        the windows (the diameter in the image's pixels).
    """
    import torch

    from cellsam.inference.runtime import autocast_context
    from cellsam.inference.segment import segment_at_scale
    from cellsam.models.protocol import inference_defaults

    native = params.model_values().tile_size
    model_diameter = inference_defaults(net).cell_diameter
    if not model_diameter:
        return native, None
    h, w = source.shape
    step = sample_step((h, w))
    signal = dataclasses.replace(norm, clahe=False).apply(source.read((0, 0, h, w), step)).max(axis=0)
    found: list[tuple[int, float | None, int]] = []  # per window: tile side, diameter, cells
    with torch.inference_mode(), autocast_context(params.precision, device):
        for rect in signal_windows(signal, step, (h, w), side=side, count=count):
            seg = segment_at_scale(prepare_window(source, norm, rect), net, device,
                                   params.replace(diameter=AUTO, return_masks=False, progress=False))
            found.append((int(seg.tile_size or native), seg.diameter, seg.n_cells))
    return weighted_median_scale(found, native)


def weighted_median_scale(found: list[tuple[int, float | None, int]], native: int) -> tuple[int, float | None]:
    """The (tile side, diameter) of the window at the cell-weighted median tile side: the scale at which
    half of the measured cells were segmented. ``found``: per window (tile side, diameter, cells); windows
    without a diameter do not count; none left (or fewer than ``MIN_MEASURED_CELLS`` cells): ``(native, None)``.
    """
    from cellsam.inference.scale import MIN_MEASURED_CELLS

    kept = sorted((t, d, n) for t, d, n in found if d is not None and n > 0)
    total = sum(n for _, _, n in kept)
    if total < MIN_MEASURED_CELLS:
        return native, None
    seen = 0
    for tile, diameter, n in kept:
        seen += n
        if 2 * seen >= total:
            return tile, diameter
    raise AssertionError("unreachable: the cumulative count reaches the total")


def measure_polarity(net: Any, device: Any, source: ImageSource, norm: Normalizer, params: SegmentParams,
                     diameter: float | str | None, *, side: int = WINDOW_SIDE, count: int = SAMPLE_WINDOWS) -> str:
    """``polarity="auto"`` for a large image: ``"inverted"`` when most of the windows of
    :func:`signal_windows` are, for :func:`cellsam.segment`, images to invert
    (:func:`~cellsam.inference.polarity.auto_inverts` at the scale ``diameter`` gives each window),
    else ``"as_is"``. ``params``: filled from the model (its ``tile_size`` is the model's own)."""
    import torch

    from cellsam.inference.polarity import auto_inverts
    from cellsam.inference.runtime import autocast_context

    native, box_threshold = params.model_values().tile_size, params.model_values().box_threshold
    h, w = source.shape
    step = sample_step((h, w))
    signal = dataclasses.replace(norm, clahe=False).apply(source.read((0, 0, h, w), step)).max(axis=0)
    votes: list[bool] = []
    with torch.inference_mode(), autocast_context(params.precision, device):
        for rect in signal_windows(signal, step, (h, w), side=side, count=count):
            votes.append(auto_inverts(net, prepare_window(source, norm, rect), native, diameter, device,
                                      box_threshold))
    return "inverted" if 2 * sum(votes) > len(votes) else "as_is"
