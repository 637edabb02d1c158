"""Segment a napari image layer tile block by tile block, with progress and a cancel point per block.

No Qt and no napari here: :func:`iter_segment` is a generator that yields :class:`Progress` after each
block of tiles and returns a :class:`~cellsam.inference.segment.Segmentation`; the widget runs it in a
napari ``thread_worker``, whose ``quit()`` stops it at the next yield.

It is the library's own path, composed from its public parts (nothing is re-implemented): the
image is read through :func:`cellsam.distributed.source.open_source`, cut into blocks of the global
tile grid (:func:`cellsam.distributed.blocks.plan_blocks`), each block's tiles segmented by
:func:`cellsam.distributed.blocks.block_cells` (which runs ``cellsam.segment``'s own
``tile_candidates``), and the cells of all blocks stitched as ``cellsam.segment`` stitches them
(``deduplicate`` in the single-process order, arg-max merge, ``clean_labels``). Two ways to normalise:

- in memory (a numpy image up to :data:`LAZY_PIXELS` pixels): the whole image is normalised once by
  :func:`~cellsam.inference.preprocess.prepare_image`, exactly as ``cellsam segment`` does, so the
  labels equal ``cellsam.segment``'s;
- lazy (a dask / zarr array, e.g. a big OME-Zarr opened by the reader, or a larger image): only a
  block's window is read at a time; percentiles come from a strided sample of the whole image and
  CLAHE runs per window with a halo (the block-wise normalisation of ``cellsam.distributed``).
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cellsam.config import DEFAULT_DIAMETER
from cellsam.inference.params import DEFAULT_MIN_AREA_REL

if TYPE_CHECKING:
    from cellsam.data.normalize import StainGrey
    from cellsam.inference.params import SegmentParams

log = logging.getLogger(__name__)

LAZY_PIXELS = 64_000_000  # above this many pixels an in-memory image is also read block by block
Channels = tuple[int | None, int | None]


@dataclass(frozen=True)
class ImageSpec:
    """How to read an image layer's array.

    Attributes:
        channel_axis: the channel axis of a 3-D array (None for 2-D); never guessed.
        channels: ``(nuclear, whole-cell)`` channel indices, either None; None for the default rules
            (one channel = whole-cell, 3/4 channels = an RGB picture).
    """

    channel_axis: int | None = None
    channels: Channels | None = None


@dataclass(frozen=True)
class SegmentOptions:
    """Parameters of :func:`cellsam.segment` that the widget offers (None: the model's own value)."""

    box_threshold: float | None = None
    iou_threshold: float | None = None
    mask_threshold: float | None = None
    min_area: int = 15
    # cells under this fraction of the median area of the image's cells are dropped (0: off)
    min_area_rel: float = DEFAULT_MIN_AREA_REL
    tile_size: int | None = None
    tile_overlap: float = 0.25
    # the typical cell diameter (pixels), "auto" (the size model, in-memory images only) or None (the
    # image's own scale), as cellsam.segment's; a given tile_size sets the scale instead
    diameter: float | str | None = DEFAULT_DIAMETER
    # "auto": the whole-cell channel of a light-background image inverted when the model prefers it so
    polarity: str = "auto"
    batch_size: int = 4
    block_tiles: int = 2  # blocks of block_tiles x block_tiles tiles: one progress step / cancel point each


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` steps, and what is happening."""

    done: int
    total: int
    message: str


def level0(data: Any) -> Any:
    """The full-resolution array of a layer's data (the first level of a multiscale list)."""
    if isinstance(data, (list, tuple)) or type(data).__name__ == "MultiScaleData":
        return data[0]
    return data


def n_channels(shape: Sequence[int], channel_axis: int | None) -> int:
    """Channels of an array of ``shape`` read with ``channel_axis`` (1 for a 2-D image)."""
    if len(shape) == 2:
        return 1
    if channel_axis is None or not -len(shape) <= channel_axis < len(shape):
        return 0
    return int(shape[channel_axis])


def is_lazy(data: Any) -> bool:
    """Read block by block: not an in-memory numpy array, or more than :data:`LAZY_PIXELS` pixels."""
    return not isinstance(data, np.ndarray) or data.size > LAZY_PIXELS * (3 if data.ndim == 3 else 1)


def open_image(data: Any, spec: ImageSpec, *, lazy: bool | None = None,
               stain: StainGrey = "luminance") -> tuple[Any, Any]:
    """(``ImageSource``, ``Normalizer``) for an array, as :func:`iter_segment` reads it; ``stain``: the model's
    colour rule (:func:`cellsam.inference.preprocess.stain_grey`).

    Raises:
        ValueError / TypeError: the library's message for a bad image or channel choice.
    """
    from cellsam.distributed.source import fit_normalizer, open_source, sample_step
    from cellsam.inference.preprocess import prepare_image

    data = level0(data)
    if lazy is None:
        lazy = is_lazy(data)
    if not lazy:
        prepared = prepare_image(np.asarray(data), channel_axis=spec.channel_axis, channels=spec.channels,
                                 stain=stain)
        return open_source(prepared, channel_axis=0), fit_normalizer([], 3, normalize=False)
    if len(data.shape) == 3 and spec.channel_axis is None:
        raise ValueError(
            f"got a 3-D image of shape {tuple(data.shape)}: choose its channel axis (first or last)"
        )
    source = open_source(data, channel_axis=spec.channel_axis)
    h, w = source.shape
    sample = source.read((0, 0, h, w), sample_step((h, w)))
    return source, fit_normalizer([sample], source.n_channels, channels=spec.channels, stain=stain)


def segment_params(net: Any, options: SegmentOptions) -> SegmentParams:
    """``cellsam.segment``'s parameters for ``net``, validated and filled (None values: the model's own)."""
    from cellsam.inference.params import SegmentParams

    o = options
    if o.batch_size < 1 or o.block_tiles < 1 or o.min_area < 0:
        raise ValueError("batch size and block size must be >= 1 and the minimum area >= 0")
    return SegmentParams(
        box_threshold=o.box_threshold, iou_threshold=o.iou_threshold, mask_threshold=o.mask_threshold,
        min_area=o.min_area, min_area_rel=o.min_area_rel, tile_size=o.tile_size, tile_overlap=o.tile_overlap,
        batch_size=o.batch_size, polarity=o.polarity,
    ).for_model(net)


def iter_segment(
    data: Any,
    model: Any,
    *,
    spec: ImageSpec = ImageSpec(),  # noqa: B008 - frozen dataclass
    options: SegmentOptions = SegmentOptions(),  # noqa: B008
    lazy: bool | None = None,
) -> Generator[Progress, None, Any]:
    """Segment ``data`` with ``model``, yielding :class:`Progress` after each block of tiles.

    With the whole-cell channel inverted when the CellFinder prefers it so on a few windows of a
    light-background image (:func:`cellsam.distributed.sample_scale.measure_polarity`, ``polarity="auto"``).
    At the scale ``options.diameter`` asks for, as :func:`cellsam.segment`: with "auto" on an in-memory
    image, the size model's, then once more at the scale of the cells found when they ask for another
    (:func:`~cellsam.inference.scale.rescale_from_cells`); on a lazy image "auto" is measured on a few
    windows of it (:func:`cellsam.distributed.sample_scale.measure_scale`, as ``segment_dask``).

    Args:
        data: (H, W) or 3-D array (numpy, dask, zarr) or a multiscale list (its first level is used).
        model: a loaded CellSAM model (see :func:`cellsam.weights.load_model`).
        lazy: force the lazy (True) or in-memory (False) normalisation; None: :func:`is_lazy`.
    Returns:
        a :class:`~cellsam.inference.segment.Segmentation` (labels int32 1..N by descending score).
    """
    from cellsam.config import AUTO, check_diameter
    from cellsam.distributed.sample_scale import measure_polarity, measure_scale
    from cellsam.inference.preprocess import stain_grey
    from cellsam.inference.runtime import resolve_model
    from cellsam.inference.scale import rescale_from_cells
    from cellsam.models.protocol import inference_defaults

    net, dev = resolve_model(model)
    p = segment_params(net, options)
    source, norm = open_image(data, spec, lazy=lazy, stain=stain_grey(net))
    in_memory = not (is_lazy(level0(data)) if lazy is None else lazy)
    native = p.model_values().tile_size
    if hasattr(net, "eval"):  # before the scale is chosen: measure_scale segments windows with it
        net.eval()
    if p.polarity == AUTO:  # decided on a few windows of the image, as segment_dask does
        probe = None if options.tile_size is not None else check_diameter(options.diameter)
        p = p.replace(polarity=measure_polarity(net, dev, source, norm, p, probe))
    if in_memory or options.tile_size is not None or check_diameter(options.diameter) != AUTO:
        p, estimated = at_scale(net, dev, source if in_memory else None, p, options)
    else:  # a lazy image with "auto": the scale its cells ask for in a few windows of it
        tile, estimated = measure_scale(net, dev, source, norm, p)
        p = p.replace(tile_size=tile)
    seg = yield from _segment_blocks(net, dev, source, norm, p, int(options.block_tiles))
    seg.diameter = estimated
    seg.inverted = p.polarity == "inverted"
    model_diameter = inference_defaults(net).cell_diameter
    if in_memory and options.tile_size is None and check_diameter(options.diameter) == AUTO and model_diameter:
        again, measured = rescale_from_cells(seg.labels, native, model_diameter, int(seg.tile_size or native))
        if again != seg.tile_size:  # the cells ask for another scale: once more at theirs, as cellsam.segment
            seg = yield from _segment_blocks(net, dev, source, norm, p.replace(tile_size=again),
                                             int(options.block_tiles))
            seg.diameter, seg.inverted = measured, p.polarity == "inverted"
        elif estimated is None:
            seg.diameter = measured
    return seg


def _segment_blocks(net: Any, dev: Any, source: Any, norm: Any, p: SegmentParams, block_tiles: int
                    ) -> Generator[Progress, None, Any]:
    """One pass over the image's tiles at ``p.tile_size``, block by block, yielding :class:`Progress`."""
    import torch

    from cellsam.distributed.blocks import GridTiles, block_cells, plan_blocks

    h, w = source.shape
    tile_size = p.model_values().tile_size
    grid = GridTiles((h, w), tile_size=tile_size, overlap=p.tile_overlap)
    blocks = plan_blocks(grid, block_tiles)
    total = len(blocks) + 1
    yield Progress(0, total, f"{len(grid)} tile(s) of {tile_size} px in {len(blocks)} block(s)")
    stats = {"tiles": len(grid), "boxes": 0, "decoded": 0, "iou_passed": 0, "masks": 0}
    gids: list[np.ndarray] = []
    cells: list[Any] = []
    for k, block in enumerate(blocks):
        with torch.inference_mode():
            found = block_cells(net, dev, source, norm, block, grid, p)
        gids.append(found.gids)
        cells += found.cells
        for key in ("boxes", "decoded", "iou_passed", "masks"):
            stats[key] += int(found.stats.get(key, 0))
        yield Progress(k + 1, total, f"block {k + 1}/{len(blocks)}: {len(cells)} candidate cell(s)")
    seg = stitch(cells, np.concatenate(gids) if gids else np.zeros(0, np.int64), grid, p, stats)
    seg.tile_size = tile_size
    yield Progress(total, total, f"{seg.n_cells} cell(s)")
    return seg


def at_scale(net: Any, dev: Any, source: Any, p: SegmentParams, options: SegmentOptions
             ) -> tuple[SegmentParams, float | None]:
    """The parameters at the scale ``options.diameter`` asks for (as :func:`cellsam.segment`), and the
    diameter used. "auto" needs the whole normalised image: ``source`` is the in-memory normalised image,
    or None for a lazy one (which then keeps its own scale)."""
    from cellsam.config import AUTO, check_diameter
    from cellsam.inference.scale import choose_scale

    diameter = check_diameter(options.diameter)
    if options.tile_size is not None:
        return p, None
    whole = None
    if diameter == AUTO and source is not None:  # the size model reads the whole normalised image
        h, w = source.shape
        whole = np.moveaxis(source.read((0, 0, h, w)), -1, 0).astype(np.float32, copy=False)
        if p.polarity == "inverted":  # the scale of the image the model will see
            from cellsam.inference.polarity import invert_whole_cell

            whole = invert_whole_cell(whole)
    tile, used = choose_scale(net, whole, p.model_values().tile_size, diameter, dev)
    return p.replace(tile_size=tile), used


def stitch(cells: list[Any], gids: np.ndarray, grid: Any, p: SegmentParams, stats: dict[str, int]) -> Any:
    """One label image from every block's cells, as ``cellsam.segment`` makes it from its tiles'."""
    from cellsam.inference.segment import stitch_candidates

    order = np.argsort(gids, kind="stable")  # gid = tile << 16 | k: the single-process order
    return stitch_candidates([cells[i] for i in order], grid, grid.shape, p, stats)
