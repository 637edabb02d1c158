"""Any magnification: the cell diameter of an image, and the tile size that shows its cells at the
size the model was trained on.

The pipeline already resizes each ``tile_size`` x ``tile_size`` input tile to the model's input side and
maps the masks back onto the input's pixel grid, so segmenting "at the model's scale" is a choice of
``tile_size``: cells of diameter ``d`` in the image appear with diameter ``d_model`` when the tile side is
``model_tile * d / d_model``. ``d_model`` is the model's ``cfg.inference.cell_diameter`` (the median cell
diameter of its training data, in image pixels at its own tile size).

``diameter="auto"`` estimates ``d`` with the model's size model when it has one (Cellpose's SizeModel:
a regression from the encoder's size features, :func:`estimate_diameter`, one encoder-stages pass over
at most :data:`MAX_SIZE_TILES` tiles); otherwise from the masks of a first pass, the median equivalent
diameter (``2 sqrt(area / pi)``) of the cells found at the model's own scale. When the estimate is
within :data:`RESCALE_TOLERANCE` of ``d_model`` the image is segmented at the model's own scale.

Then, as Cellpose refines its SizeModel's estimate with the masks it finds, the cells of that pass are
measured (:func:`rescale_from_cells`): when their median diameter asks for a scale more than
:data:`RESCALE_TOLERANCE` from the one used, the image is segmented once more at theirs. On the validation
split the masks' diameter is about twice as close to the truth as the size model's (mean absolute log
error 0.08 vs 0.15, ``benchmarks/scale_study.md``).
"""

from __future__ import annotations

import numpy as np
import torch

from cellsam.config import AUTO
from cellsam.inference.tiling import spread_tiles
from cellsam.models.protocol import inference_defaults

__all__ = ["MAX_SCALE", "MIN_MEASURED_CELLS", "RESCALE_TOLERANCE", "choose_scale", "estimate_diameter",
           "has_size_model", "median_diameter", "needs_rescale", "rescale_from_cells", "tile_size_for"]

RESCALE_TOLERANCE = 1.3
"""No second pass when the estimated diameter is within this factor of the model's (either side)."""
MIN_MEASURED_CELLS = 5
"""A pass's cells set the scale only when there are at least this many (a median of fewer is noise)."""
MAX_SCALE = 4.0
"""Images are resized by at most this factor either way (tiles from model_tile / 4 to model_tile * 4)."""
MIN_TILE = 32
MAX_SIZE_TILES = 16
"""The size model looks at most at this many tiles of an image (spread over it; blank ones skipped)."""


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent diameter ``2 sqrt(area / pi)`` of the labelled cells, in pixels.

    Args:
        labels: (H, W) integer label image, 0 = background.
    Returns:
        the median over cells, or None when there is no cell.
    """
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64, copy=False))[1:]
    areas = counts[counts > 0]
    if areas.size == 0:
        return None
    return float(np.median(2.0 * np.sqrt(areas / np.pi)))


def tile_size_for(model_tile: int, model_diameter: float, diameter: float) -> int:
    """Input tile side that shows cells of ``diameter`` pixels at the model's ``model_diameter``.

    The scale is clamped to [1 / MAX_SCALE, MAX_SCALE] and the tile to at least 32 pixels.
    """
    if model_tile < 1 or not model_diameter > 0 or not diameter > 0:
        raise ValueError(f"need model_tile >= 1 and diameters > 0, got {model_tile}, {model_diameter}, {diameter}")
    ratio = min(max(diameter / model_diameter, 1.0 / MAX_SCALE), MAX_SCALE)
    return max(MIN_TILE, int(round(model_tile * ratio)))


def needs_rescale(estimated: float | None, model_diameter: float) -> bool:
    """Whether an estimated diameter is far enough from the model's to segment again."""
    if estimated is None:
        return False
    ratio = estimated / model_diameter
    return not 1.0 / RESCALE_TOLERANCE <= ratio <= RESCALE_TOLERANCE


def rescale_from_cells(labels: np.ndarray, model_tile: int, model_diameter: float, tile: int
                       ) -> tuple[int, float | None]:
    """The tile side the cells of a pass made at ``tile`` ask for, and their median diameter.

    Args:
        labels: (H, W) label image of the pass, in the image's pixels.
        model_tile, model_diameter: the model's own tile side and cell diameter.
        tile: the tile side the pass was made at.
    Returns:
        ``(tile, measured)`` unchanged when the cells' scale is within :data:`RESCALE_TOLERANCE` of it (the
        model's own tile when the measured diameter is within that factor of ``model_diameter``), else
        ``(new_tile, measured)``; ``measured`` is None (and ``tile`` kept) with fewer than
        :data:`MIN_MEASURED_CELLS` cells.
    """
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64, copy=False))[1:]
    if int((counts > 0).sum()) < MIN_MEASURED_CELLS:
        return tile, None
    measured = median_diameter(labels)
    if measured is None:
        return tile, None
    wanted = tile_size_for(model_tile, model_diameter, measured) if needs_rescale(measured, model_diameter) \
        else model_tile
    if max(wanted, tile) <= RESCALE_TOLERANCE * min(wanted, tile):
        return tile, measured
    return wanted, measured


def has_size_model(net: object) -> bool:
    """Whether ``net`` has a fitted size model (``cfg.size_head``, fitted by a "size" training stage)."""
    head = getattr(net, "size_head", None)
    return head is not None and bool(getattr(head, "fitted", False))


def estimate_diameter(net: object, image: np.ndarray, tile_size: int, device: torch.device) -> float | None:
    """The median cell diameter of a prepared (3, H, W) image in its pixels, from the size model.

    The image's tiles at ``tile_size`` (at most :data:`MAX_SIZE_TILES`, spread evenly, constant ones
    skipped) go through the encoder's stages; the per-tile predictions' median (in log space) is
    scaled from model-input to image pixels. None when every tile is blank.
    """
    crops = spread_tiles(image, tile_size, MAX_SIZE_TILES)
    if not crops:
        return None
    s = int(net.img_size)  # type: ignore[attr-defined]
    x = torch.from_numpy(np.stack(crops)).to(device)
    if s != tile_size:
        x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False,
                                            antialias=True).clamp_(0.0, 1.0)
    d = net.predict_diameter(net.preprocess(x))  # type: ignore[attr-defined]
    return float(torch.exp(torch.log(d.float()).median())) * tile_size / s


def choose_scale(net: object, image: np.ndarray | None, native: int, diameter: float | str | None,
                 device: torch.device) -> tuple[int, float | None]:
    """The input tile side to segment a prepared (3, H, W) ``image`` at, and the diameter that set it.

    ``diameter``: None (the image's own scale), a number of pixels, or ``"auto"`` (the size model's
    estimate on ``image``; with no ``image`` or no fitted size model, the image's own scale). ``native``:
    the model's own tile side. A model without ``cell_diameter`` keeps ``native``.
    """
    model_diameter = inference_defaults(net).cell_diameter
    if diameter is None or not model_diameter:
        return native, None
    if diameter == AUTO:
        if image is None or not has_size_model(net):
            return native, None
        estimated = estimate_diameter(net, image, native, device)
        if estimated is None or not needs_rescale(estimated, model_diameter):
            return native, estimated
        diameter = estimated
    return tile_size_for(native, model_diameter, float(diameter)), float(diameter)
