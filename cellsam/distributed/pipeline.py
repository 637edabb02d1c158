"""``segment_dask``: one large image through the block pipeline of :mod:`.blocks` on a Dask cluster.

Stages (each a set of Dask tasks, each failure reported by position through :func:`.cluster.wait_all`):
global statistics sample -> block segmentation -> copy edges inside and across blocks -> per-component
``deduplicate`` -> per-block final cells -> the relative minimum area over every block's cell areas ->
label ids (score descending, as single-process) -> OME-Zarr level 0 by regions of whole chunks -> pyramid
levels. Only small per-cell metadata (ids, scores, areas, copy edges) comes back to the client; masks stay
on the workers.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.config import AUTO, DEFAULT_DECODE_WINDOW, DEFAULT_DIAMETER, FlipTest, InferenceConfig
from cellsam.data.normalize import StainGrey
from cellsam.distributed import blocks as B
from cellsam.distributed import omezarr
from cellsam.distributed.cluster import BlockFailure, close_client, get_client, wait_all, worker_model
from cellsam.distributed.sample_scale import measure_polarity, measure_scale
from cellsam.distributed.source import ImageSource, Normalizer, fit_normalizer, open_source, sample_step
from cellsam.inference.params import DEFAULT_MIN_AREA, DEFAULT_MIN_AREA_REL, SegmentParams, params_or_keywords
from cellsam.inference.scale import tile_size_for
from cellsam.inference.tiling import score_floor
from cellsam.models.protocol import inference_defaults, model_tile_size
from cellsam.ops.masks import area_floor

__all__ = ["BlockFailure", "LargeResult", "segment_dask"]


# ----------------------------------------------------------------------------------- worker tasks
def _block_task(
    model: Any,
    device: Any,
    source: ImageSource,
    norm: Any,
    block: B.Block,
    grid: B.GridTiles,
    params: SegmentParams,
) -> B.BlockCells:
    import torch

    net, dev = worker_model(model, device)
    with torch.inference_mode():
        return B.block_cells(net, dev, source, norm, block, grid, params)


def _model_defaults_task(model: Any, device: Any) -> tuple[int, InferenceConfig]:
    """The model's own tile size and inference defaults (``cfg.tile_size``, ``cfg.inference``)."""
    net, _ = worker_model(model, device)
    return model_tile_size(net), inference_defaults(net)


def _scale_task(model: Any, device: Any, source: ImageSource, norm: Normalizer, params: SegmentParams
                ) -> tuple[int, float | None]:
    """diameter="auto": the tile side and diameter measured on a few windows (:mod:`.sample_scale`)."""
    net, dev = worker_model(model, device)
    return measure_scale(net, dev, source, norm, params)


def _polarity_task(model: Any, device: Any, source: ImageSource, norm: Normalizer, params: SegmentParams,
                   diameter: float | str | None) -> str:
    """polarity="auto": "inverted" or "as_is", decided on a few windows (:mod:`.sample_scale`)."""
    net, dev = worker_model(model, device)
    return measure_polarity(net, dev, source, norm, params, diameter)


def _sample_task(source: ImageSource, rect: B.Rect, step: int) -> np.ndarray:
    y0, x0, _, _ = rect
    return source.read((y0 + (-y0) % step, x0 + (-x0) % step, rect[2], rect[3]), step)


def _ids_task(cells: B.BlockCells) -> tuple[np.ndarray, np.ndarray, int]:
    return cells.gids, cells.edges, int(cells.stats.get("blank", 0))


def _order_task(fin: B.FinalCells) -> tuple[np.ndarray, np.ndarray]:
    return fin.gids, fin.scores


def _write_task(path: str, region: B.Rect, finals: list[B.FinalCells], ids: list[np.ndarray]) -> int:
    return omezarr.write_region(path, region, B.paint(region, list(zip(finals, ids, strict=True))))


def _rows_task(fin: B.FinalCells, ids: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for (y0, x0, m), lab, s, q in zip(fin.cells, ids, fin.scores, fin.ious, strict=True):
        ys, xs = np.nonzero(m)
        rows.append(
            {
                "label": int(lab),
                "area": int(ys.size),
                "centroid_y": round(float(ys.mean() + y0), 2),
                "centroid_x": round(float(xs.mean() + x0), 2),
                "bbox_y0": y0 + int(ys.min()),
                "bbox_x0": x0 + int(xs.min()),
                "bbox_y1": y0 + int(ys.max()) + 1,
                "bbox_x1": x0 + int(xs.max()) + 1,
                "score": round(float(s), 4),
                "iou_pred": round(float(q), 4),
            }
        )
    return rows


# ------------------------------------------------------------------------------------ the pipeline
@dataclass
class LargeResult:
    """What :func:`segment_dask` wrote: ``path`` (OME-Zarr), image ``shape``, ``n_cells``, ``levels``,
    ``rows`` (one :func:`cellsam.io.cell_table`-like dict per label), ``stats`` and ``seconds``."""

    path: Path
    shape: tuple[int, int]
    n_cells: int
    levels: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    diameter: float | None = None  # the cell diameter that set the scale (given, or measured by auto)
    tile_size: int = 0  # the input tile side the image was segmented at (the model's own: its scale)
    inverted: bool = False  # the model saw the whole-cell channel inverted (polarity)


BLOCK_SIDE = 2048
"""Side in pixels that :func:`auto_block_tiles` aims a block at: each block is a few Dask tasks, so on
a 40000 x 40000 image 4 x 4 tiles of 256 px (2,300 blocks) spend most of their time in Dask's
bookkeeping; about 2048 px keeps a worker's window near 100 MB."""


def auto_block_tiles(grid: B.GridTiles) -> int:
    """Tiles per block side for blocks of about :data:`BLOCK_SIDE` pixels (at least 4)."""
    step = grid.ys[1] - grid.ys[0] if len(grid.ys) > 1 else grid.tile_size
    return max(4, BLOCK_SIDE // max(int(step), 1))


class _Tasks:
    """Submits one run's tasks under unique keys (``cellsam-<run>-<name>``) with ``retries``."""

    def __init__(self, client: Any, retries: int) -> None:
        self.client, self.retries, self.run = client, retries, uuid.uuid4().hex[:8]

    def __call__(self, fn: Any, *args: Any, key: str) -> Any:
        return self.client.submit(fn, *args, key=f"cellsam-{self.run}-{key}", retries=self.retries, pure=False)


def segment_dask(
    image: Any,
    model: Any = "default",
    *,
    output: str | Path,
    client: Any = None,
    n_workers: int | None = None,
    channel_axis: int | None = None,
    channels: tuple[int | None, int | None] | None = None,
    normalize: bool = True,
    box_threshold: float | None = None,
    box_threshold_rel: float | None = None,
    iou_threshold: float | None = None,
    mask_threshold: float | None = None,
    min_area: int = DEFAULT_MIN_AREA,
    min_area_rel: float = DEFAULT_MIN_AREA_REL,
    tile_size: int | None = None,
    tile_overlap: float = 0.25,
    diameter: float | str | None = DEFAULT_DIAMETER,
    polarity: str = AUTO,
    batch_size: int = 4,
    decode_chunk: int | None = None,
    decode_copies: bool = False,
    decode_window: float | None = DEFAULT_DECODE_WINDOW,
    flip_test: FlipTest | bool | None = None,
    device: Any = None,
    block_tiles: int | None = None,
    chunk: int = 1024,
    levels: int | None = None,
    region_chunks: int = 2,
    retries: int = 2,
    params: SegmentParams | None = None,
) -> LargeResult:
    """Segment one large image on Dask and write its labels to ``output`` (an ``.ome.zarr`` folder).

    Args:
        image: a path (OME-Zarr / Zarr, TIFF, NPY; read lazily) or an array (H, W) / 3-D with
            ``channel_axis``.
        model: weights name / checkpoint path (loaded once per worker) or a model object (scattered).
        client: a ``distributed.Client``, a scheduler address, or None for a LocalCluster of ``n_workers``.
        block_tiles: blocks are ``block_tiles`` x ``block_tiles`` tiles of the global tile grid (None:
            :func:`auto_block_tiles`, blocks of about ``BLOCK_SIDE`` pixels).
        chunk: OME-Zarr chunk side; levels: pyramid levels (None: until one chunk holds the image);
        region_chunks: level-0 regions written per task, in chunks per side.
        retries: Dask retries per task. The other arguments are those of :func:`cellsam.segment`
            (``None`` thresholds and tile size: the model's own; ``params``: all of them as one
            :class:`~cellsam.inference.params.SegmentParams`); ``diameter="auto"`` (the default) is
            measured on a few windows of the image with the most signal (:mod:`.sample_scale`), each
            segmented as :func:`cellsam.segment` would, and the whole image is then segmented at the
            scale their cells ask for; ``polarity="auto"`` (the default) is decided on the same windows
            (:func:`~.sample_scale.measure_polarity`) and holds for the whole image.
    Raises:
        BlockFailure: a block / region failed after all retries (positions in the message).
    """
    t0 = time.perf_counter()
    params = params_or_keywords(
        params, box_threshold=box_threshold, box_threshold_rel=box_threshold_rel, iou_threshold=iou_threshold,
        mask_threshold=mask_threshold, min_area=min_area, min_area_rel=min_area_rel, tile_size=tile_size,
        tile_overlap=tile_overlap, diameter=diameter, polarity=polarity, batch_size=batch_size,
        decode_chunk=decode_chunk, decode_copies=decode_copies, decode_window=decode_window, flip_test=flip_test,
    )
    auto = params.diameter == AUTO  # the default: measured on a few windows once the image is normalised
    params = params.replace(diameter=None if auto else params.diameter, return_masks=False, progress=False)
    source = open_source(image, channel_axis=channel_axis)
    client, owned = get_client(client, n_workers=n_workers)
    submit = _Tasks(client, retries)
    try:
        src = client.scatter(source, broadcast=True) if source.array is not None else source
        net = model if isinstance(model, (str, os.PathLike)) else client.scatter(model, broadcast=True)
        tile, inference = submit(_model_defaults_task, net, device, key="model-defaults").result()
        params = _fill_params(tile, inference, params)
        norm = _normalizer(submit, src, source, channels=channels, normalize=normalize, stain=inference.stain_grey)
        used: float | None = params.diameter if isinstance(params.diameter, float) else None
        if params.polarity == AUTO:
            where = "the image's sample and windows"  # a failure is reported as the blocks' are
            futs = wait_all("polarity", {where: submit(_polarity_task, net, device, src, norm, params,
                                                       AUTO if auto else params.diameter, key="polarity")})
            params = params.replace(polarity=futs[where].result())
        if auto:
            tile, used = submit(_scale_task, net, device, src, norm, params, key="scale").result()
            params = params.replace(tile_size=tile)
        h, w = source.shape
        grid = B.GridTiles((h, w), tile_size=params.model_values().tile_size, overlap=params.tile_overlap)
        blocks = B.plan_blocks(grid, auto_block_tiles(grid) if block_tiles is None else block_tiles)
        cells = _segment_blocks(submit, net, device, src, norm, blocks, grid, params)
        cells = _confident(submit, cells, params.model_values().box_threshold_rel)
        pairs = _touching_pairs(blocks)
        ids, edges = _copy_edges(submit, cells, pairs, grid)
        kept = _resolve(submit, cells, blocks, grid, np.concatenate([g for g, _, _ in ids]), edges)
        finals = _final_cells(submit, cells, kept, blocks, pairs, params.min_area)
        finals = _large_enough(submit, finals, params.min_area, params.min_area_rel)
        del cells
        label_ids = _label_ids(_gather(submit, "order", _order_task, finals))
        arrays = omezarr.create(output, (h, w), chunk=chunk, levels=levels, name=Path(output).name,
                                extra={"source": str(image) if source.path else "array"})
        _write_labels(submit, str(output), arrays, (h, w), blocks, finals, label_ids, chunk=chunk,
                      region_chunks=region_chunks)
        rows_f = wait_all("table", {str(i): submit(_rows_task, f, label_ids[i], key=f"rows-{i}")
                                    for i, f in enumerate(finals)})
        rows = sorted((r for f in rows_f.values() for r in f.result()), key=lambda r: r["label"])
        stats = {
            "blocks": len(blocks),
            "tiles": len(grid),
            "blank_tiles": int(sum(b for _, _, b in ids)),  # constant tiles: no encoder pass
            "candidates": int(sum(g.size for g, _, _ in ids)),
            "kept": int(sum(k.size for k in kept)),
            "cells": len(rows),
        }
        return LargeResult(Path(output), (h, w), len(rows), len(arrays), rows, stats, time.perf_counter() - t0,
                           diameter=used, tile_size=params.model_values().tile_size,
                           inverted=params.polarity == "inverted")
    finally:
        if owned:
            close_client(client)


# ------------------------------------------------------------------------------------ the stages
def _fill_params(tile: int, inference: InferenceConfig, params: SegmentParams) -> SegmentParams:
    """``params`` filled from the model's tile size and defaults (read on a worker), the tile size scaled for
    a ``diameter``."""
    if params.tile_size is not None and None not in (params.box_threshold, params.box_threshold_rel,
                                                     params.iou_threshold, params.mask_threshold):
        return params.replace(filled=True)
    filled = params.filled_from(tile, inference)
    if params.diameter is None:
        return filled
    # the scale where the cells have the model's diameter (filled_from checked that it has one)
    assert inference.cell_diameter is not None and isinstance(params.diameter, float)
    return filled.replace(tile_size=tile_size_for(int(tile), float(inference.cell_diameter), params.diameter))


def _normalizer(submit: _Tasks, src: Any, source: ImageSource, *, channels: tuple[int | None, int | None] | None,
                normalize: bool, stain: StainGrey = "luminance") -> Normalizer:
    """1. Global normalisation statistics from a strided sample, read in parallel."""
    samples: list[np.ndarray] = []
    if normalize:
        h, w = source.shape
        step = sample_step((h, w))
        futs = {
            f"sample region y {r[0]}:{r[2]}, x {r[1]}:{r[3]}": submit(_sample_task, src, r, step, key=f"sample-{i}")
            for i, r in enumerate(omezarr.regions((h, w), 4096))
        }
        samples = [f.result() for f in wait_all("sample", futs).values()]
    return fit_normalizer(samples, source.n_channels, channels=channels, normalize=normalize, stain=stain)


def _segment_blocks(submit: _Tasks, net: Any, device: Any, src: Any, norm: Normalizer, blocks: list[B.Block],
                    grid: B.GridTiles, params: SegmentParams) -> list[Any]:
    """2. Every block's cells (futures of :class:`~.blocks.BlockCells`, in block order)."""
    futs = {b.describe(): submit(_block_task, net, device, src, norm, b, grid, params, key=f"block-{b.index}")
            for b in blocks}
    return list(wait_all("segment", futs).values())


def _confident(submit: _Tasks, cells: list[Any], rel: float) -> list[Any]:
    """2b. The relative box threshold over the whole image: every block's scores gathered, then each block
    keeps its cells above the one floor (futures, in block order)."""
    if rel <= 0:
        return cells
    floor = score_floor(np.concatenate([np.zeros(0), *_gather(submit, "scores", B.scores, cells)]), rel)
    futs = {str(i): submit(B.above, c, floor, key=f"confident-{i}") for i, c in enumerate(cells)}
    return list(wait_all("confident", futs).values())


def _touching_pairs(blocks: list[B.Block]) -> list[tuple[B.Block, B.Block]]:
    """Pairs (a, b) of blocks that share pixels, a before b."""
    rects = np.array([b.rect for b in blocks], np.int64)
    return [(a, blocks[j]) for a in blocks for j in B.touching(rects, a.rect) if j > a.index]


def _gather(submit: _Tasks, stage: str, fn: Any, parts: list[Any]) -> list[Any]:
    """``fn(part)`` for every part on the workers, results in order."""
    futs = {str(i): submit(fn, part, key=f"{stage}-{i}") for i, part in enumerate(parts)}
    return [f.result() for f in wait_all(stage, futs).values()]


def _copy_edges(submit: _Tasks, cells: list[Any], pairs: list[tuple[B.Block, B.Block]],
                grid: B.GridTiles) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], np.ndarray]:
    """3. Copies inside blocks and across block borders: per block (gids, edges, blank tiles), and all edges."""
    cross = {
        f"border of blocks {a.index} and {b.index}": submit(
            B.copy_edges,
            submit(B.select, cells[a.index], b.rect, key=f"sel-{a.index}-{b.index}"),
            submit(B.select, cells[b.index], a.rect, key=f"sel-{b.index}-{a.index}"),
            grid,
            key=f"edges-{a.index}-{b.index}",
        )
        for a, b in pairs
    }
    ids = _gather(submit, "ids", _ids_task, cells)
    edges = [e for _, e, _ in ids] + [f.result() for f in wait_all("edges", cross).values()]
    return ids, np.concatenate(edges)


def _final_cells(submit: _Tasks, cells: list[Any], kept: list[np.ndarray], blocks: list[B.Block],
                 pairs: list[tuple[B.Block, B.Block]], min_area: int) -> list[Any]:
    """5. Final cells per block: its kept cells merged with the neighbours' kept cells that reach into it."""
    kept_cells = [submit(B.pick, cells[b.index], kept[b.index], key=f"kept-{b.index}") for b in blocks]
    nbrs = defaultdict(list)
    for a, b in pairs:
        nbrs[a.index].append(submit(B.select, kept_cells[b.index], a.rect, key=f"ksel-{b.index}-{a.index}"))
        nbrs[b.index].append(submit(B.select, kept_cells[a.index], b.rect, key=f"ksel-{a.index}-{b.index}"))
    futs = {
        b.describe(): submit(B.final_cells, kept_cells[b.index], nbrs[b.index], b.rect, int(min_area),
                             key=f"final-{b.index}")
        for b in blocks
    }
    return list(wait_all("final", futs).values())


def _large_enough(submit: _Tasks, finals: list[Any], min_area: int, rel: float) -> list[Any]:
    """5b. The relative minimum area over the whole image: every block's cell areas gathered, then each block
    keeps its cells of at least the one floor (futures, in block order)."""
    if rel <= 0:
        return finals
    floor = area_floor(np.concatenate([np.zeros(0, np.int64), *_gather(submit, "areas", B.areas, finals)]),
                       min_area=min_area, min_area_rel=rel)
    futs = {str(i): submit(B.at_least, f, floor, key=f"large-{i}") for i, f in enumerate(finals)}
    return list(wait_all("large", futs).values())


def _write_labels(submit: _Tasks, out: str, arrays: list[Any], shape: tuple[int, int], blocks: list[B.Block],
                  finals: list[Any],
                  label_ids: list[np.ndarray], *, chunk: int, region_chunks: int) -> None:
    """6. OME-Zarr: level 0 by regions of whole chunks, then the pyramid."""
    rects = np.array([b.rect for b in blocks], np.int64)
    writes = {}
    for i, reg in enumerate(omezarr.regions(shape, chunk * max(1, int(region_chunks)))):
        touch = B.touching(rects, reg).tolist()
        writes[f"region y {reg[0]}:{reg[2]}, x {reg[1]}:{reg[3]}"] = submit(
            _write_task, out, reg, [finals[k] for k in touch], [label_ids[k] for k in touch], key=f"write-{i}"
        )
    wait_all("write", writes)
    for lev in range(1, len(arrays)):
        wait_all(
            f"level {lev}",
            {
                f"level {lev} region {r}": submit(omezarr.downsample_level, out, lev, r, key=f"level-{lev}-{i}")
                for i, r in enumerate(omezarr.regions(arrays[lev].shape, chunk * 4))
            },
        )


def _resolve(
    submit: _Tasks,
    cells: list[Any],
    blocks: list[B.Block],
    grid: B.GridTiles,
    gids: np.ndarray,
    edges: np.ndarray,
) -> list[np.ndarray]:
    """4. Kept gids per block: singletons kept, each component of the copy graph deduplicated on the
    worker of the block holding its smallest gid (its cells from other blocks are fetched)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    block_of_tile = np.zeros(len(grid), np.int64)
    for b in blocks:
        block_of_tile[list(b.tiles)] = b.index
    gids = np.sort(gids)
    owner = block_of_tile[gids >> B.GID_SHIFT]
    kept: list[list[np.ndarray]] = [[] for _ in blocks]
    if gids.size == 0:
        return [np.zeros(0, np.int64) for _ in blocks]
    e = np.searchsorted(gids, edges) if edges.size else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(gids.size, gids.size))
    n_comp, comp = connected_components(graph, directed=False)
    size = np.bincount(comp, minlength=n_comp)
    single = size[comp] == 1
    for b in blocks:
        kept[b.index].append(gids[single & (owner == b.index)])
    multi = np.flatnonzero(~single)
    by_comp = defaultdict(list)
    for i in multi[np.argsort(comp[multi], kind="stable")]:
        by_comp[int(comp[i])].append(i)
    jobs: dict[int, list[np.ndarray]] = defaultdict(list)
    for members in by_comp.values():
        jobs[int(owner[members[0]])].append(gids[members])
    futs = {}
    for bi, comps in jobs.items():
        need = np.concatenate(comps)
        others = sorted(set(owner[np.searchsorted(gids, need)].tolist()) - {bi})
        extras = [submit(B.pick, cells[o], need, key=f"pick-{bi}-{o}") for o in others]
        futs[blocks[bi].describe()] = submit(B.resolve, cells[bi], extras, comps, grid, key=f"resolve-{bi}")
    for f in wait_all("stitch", futs).values():
        res = f.result()
        for bi in np.unique(block_of_tile[res >> B.GID_SHIFT]):
            kept[int(bi)].append(res[block_of_tile[res >> B.GID_SHIFT] == bi])
    return [np.sort(np.concatenate(k)) for k in kept]


def _label_ids(order: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Per block, the label id of each final cell: rank by (score descending, gid ascending), from 1."""
    gids = np.concatenate([g for g, _ in order]) if order else np.zeros(0, np.int64)
    scores = np.concatenate([s for _, s in order]) if order else np.zeros(0, np.float32)
    rank = np.empty(gids.size, np.int64)
    rank[np.lexsort((gids, -scores.astype(np.float64)))] = np.arange(1, gids.size + 1)
    if gids.size >= 2**32:
        raise ValueError("more than 2**32 - 1 cells do not fit uint32 labels")
    out, k = [], 0
    for g, _ in order:
        out.append(rank[k : k + g.size].astype(np.uint32))
        k += g.size
    return out
