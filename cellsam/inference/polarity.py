"""Cell polarity: whether the model should see an image's whole-cell channel inverted.

The model learnt cells brighter than their background: fluorescence as it is, and stained bright-field
pictures inverted when they are read (:mod:`cellsam.data.normalize`). A single-channel phase-contrast or
bright-field picture is never inverted when it is read, because phase contrast shows cells either way:
mammalian cells in phase contrast come out bright enough as they are, while bacteria in phase contrast
are dark rods on a light background, and the model then outlines the light gaps between them (our val
E. coli image: F1@0.5 0.09 as it is, 0.30 inverted).

``polarity="auto"`` (the default of :func:`cellsam.segment`) decides per image, as a person would look at
both versions:

* an image whose whole-cell (blue) channel has a dark background (median <= :data:`BRIGHT_BACKGROUND`,
  fluorescence) is segmented as it is, at no cost;
* otherwise the CellFinder runs on at most :data:`PROBE_TILES` tiles of the image as it is and inverted
  (``1 - blue``, the nuclear channel untouched), at the scale chosen for the image as it is, and the image
  is inverted when the inverted tiles' detections are the more confident ones (:func:`detection_confidence`:
  the mean of the upper half of the box scores above the box threshold).

On the 24 val and test images of our data with a light background (9 + 7 DSB, 2 + 4 MoNuSeg H&E, the two
DeepCell phase images) this picks the better polarity every time; only the E. coli image is inverted
(``benchmarks/polarity.md``). ``"as_is"`` and ``"inverted"`` fix the choice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cellsam.inference.scale import choose_scale
from cellsam.inference.tiling import spread_tiles

__all__ = ["BRIGHT_BACKGROUND", "PROBE_TILES", "auto_inverts", "bright_background", "detection_confidence",
           "invert_whole_cell", "prefers_inverted"]

BRIGHT_BACKGROUND = 0.2
"""A whole-cell channel whose median is above this (in [0, 1]) has a light background: the polarity is
checked. On our data fluorescence images have medians of 0.00-0.17, phase and bright-field 0.2-0.9."""
PROBE_TILES = 4
"""Tiles per polarity that the CellFinder looks at to choose."""


def invert_whole_cell(image: np.ndarray) -> np.ndarray:
    """A prepared (3, H, W) image in [0, 1] with its whole-cell (blue) channel inverted (``1 - x``)."""
    out = np.array(image, dtype=np.float32, copy=True)
    out[2] = 1.0 - out[2]
    return out


def bright_background(image: np.ndarray) -> bool:
    """Whether a prepared (3, H, W) image's whole-cell channel has a light background (its median >
    :data:`BRIGHT_BACKGROUND`), the images whose polarity ``"auto"`` checks."""
    return bool(np.median(image[2]) > BRIGHT_BACKGROUND)


def detection_confidence(net: Any, image: np.ndarray, tile_size: int, device: torch.device,
                         box_threshold: float) -> float:
    """How sure the CellFinder is of the cells in a prepared (3, H, W) image, in [0, 1].

    The mean of the upper half of the box scores above ``box_threshold`` on at most :data:`PROBE_TILES`
    tiles of ``tile_size`` input pixels (spread over the image, constant ones left out), each resized to
    the model's input side; 0 when no box passes.
    """
    crops = spread_tiles(image, tile_size, PROBE_TILES)
    if not crops:
        return 0.0
    s = int(net.img_size)
    x = torch.from_numpy(np.stack(crops)).to(device)
    if s != tile_size:
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    x = net.preprocess(x)
    # the one view, without the flip test: the rule was measured on its scores (benchmarks/flip_test.md)
    dets = net.postprocess_detections(net.detect(net.encode(x), x, flip_test="off"), box_threshold=box_threshold)
    scores = np.sort(np.concatenate([d["scores"].float().cpu().numpy() for d in dets]))
    if scores.size == 0:
        return 0.0
    return float(scores[scores.size // 2 :].mean())


def prefers_inverted(net: Any, image: np.ndarray, tile_size: int, device: torch.device,
                     box_threshold: float) -> bool:
    """Whether the CellFinder is more confident on the image with its whole-cell channel inverted
    (:func:`detection_confidence` at ``tile_size``). Images with a dark background: False, not checked."""
    if not bright_background(image):
        return False
    as_is = detection_confidence(net, image, tile_size, device, box_threshold)
    inverted = detection_confidence(net, invert_whole_cell(image), tile_size, device, box_threshold)
    return inverted > as_is


def auto_inverts(net: Any, image: np.ndarray, native: int, diameter: float | str | None, device: torch.device,
                 box_threshold: float) -> bool:
    """``polarity="auto"``'s choice for a prepared (3, H, W) image whose scale is not chosen yet: False for
    a dark background (no size-model pass), else :func:`prefers_inverted` at the tile side
    :func:`~cellsam.inference.scale.choose_scale` gives the image as it is for ``diameter`` (``native``:
    the model's own tile)."""
    if not bright_background(image):
        return False
    tile, _ = choose_scale(net, image, native, diameter, device)
    return prefers_inverted(net, image, tile, device, box_threshold)
