"""Block-wise segmentation of a large image with exactly the single-process stitching.

A *block* is a rectangle of tiles of the image's global tile grid
(:func:`~cellsam.inference.tiling.tile_grid`), so neighbouring blocks overlap by the tiles' overlap and
every tile is segmented once, by the same code as in :func:`cellsam.segment` (``tile_candidates``).
Each cell found gets a global id
``gid = tile_index * 2**16 + k`` (k-th cell of that tile), whose order is the single-process order.

Stitching reuses :func:`~cellsam.inference.tiling.deduplicate` unchanged, without ever holding all cells:

1. :func:`copy_edges`: for each pair of cells whose masks' boxes intersect (inside a block and across
   neighbouring blocks) ``deduplicate([a, b])`` says whether they are copies / near-identical;
2. the connected components of these edges are independent: ``deduplicate`` on one component keeps
   the same cells as ``deduplicate`` on the whole image (its two greedy passes only look at such
   pairs, in the same order), so :func:`resolve` runs it per component;
3. :func:`final_cells`: the arg-max merge and the per-label cleaning of
   :func:`~cellsam.ops.masks.merge_by_argmax` / :func:`~cellsam.ops.masks.clean_labels` are local to a
   cell's crop, so each block redoes them for its own kept cells with the neighbours' kept cells that
   overlap the block. Label ids are then assigned by descending score (ties: gid), as single-process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from cellsam.distributed.source import ImageSource, Normalizer, Rect, prepare_window
from cellsam.inference.params import SegmentParams
from cellsam.inference.tiling import Candidate, Tile, axis_cores, deduplicate, default_band, tile_grid
from cellsam.ops.masks import clean_labels, merge_by_argmax

if TYPE_CHECKING:
    import torch

    from cellsam.models.protocol import SegmentationModel

GID_SHIFT = 16  # cells per tile < 65536


class GridTiles(Sequence[Tile]):
    """The global tile grid as a lazy sequence (index ``r * n_cols + c``), equal to ``tile_grid``."""

    def __init__(self, shape: tuple[int, int], *, tile_size: int, overlap: float) -> None:
        h, w = shape
        self.shape, self.tile_size = (int(h), int(w)), int(tile_size)
        self.ys = tuple(t.y0 for t in tile_grid((h, 1), tile_size=tile_size, overlap=overlap))
        self.xs = tuple(t.x0 for t in tile_grid((1, w), tile_size=tile_size, overlap=overlap))
        band = default_band(self.tile_size)
        self._core_rows = axis_cores(self.ys, self.tile_size, band)
        self._core_cols = axis_cores(self.xs, self.tile_size, band)

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    @overload
    def __getitem__(self, i: int) -> Tile: ...
    @overload
    def __getitem__(self, i: slice) -> list[Tile]: ...
    def __getitem__(self, i: int | slice) -> Tile | list[Tile]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        r, c = divmod(int(i) % len(self), len(self.xs))
        y, x, t = self.ys[r], self.xs[c], self.tile_size
        return Tile(y, x, min(y + t, self.shape[0]), min(x + t, self.shape[1]))

    def __iter__(self) -> Iterator[Tile]:
        return (self[i] for i in range(len(self)))

    def core(self, i: int) -> tuple[float, float, float, float]:
        """Tile ``i``'s core, as :func:`~cellsam.inference.tiling.tile_cores` gives it for the whole grid."""
        r, c = divmod(int(i), len(self.xs))
        return (*self._core_rows[r], *self._core_cols[c])


@dataclass(frozen=True)
class Block:
    """Tiles ``rows x cols`` of the grid; ``rect`` is their union (y0, x0, y1, x1) in image pixels."""

    index: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    tiles: tuple[int, ...]
    rect: Rect

    def describe(self) -> str:
        y0, x0, y1, x1 = self.rect
        return (
            f"block {self.index} (tile rows {self.rows[0]}..{self.rows[1] - 1}, cols {self.cols[0]}.."
            f"{self.cols[1] - 1}; pixels y {y0}:{y1}, x {x0}:{x1})"
        )


def plan_blocks(grid: GridTiles, block_tiles: int) -> list[Block]:
    """Cut the grid into blocks of at most ``block_tiles`` x ``block_tiles`` tiles, row-major."""
    if not isinstance(block_tiles, (int, np.integer)) or block_tiles < 1:
        raise ValueError(f"block_tiles must be an integer >= 1, got {block_tiles!r}")
    nr, nc = len(grid.ys), len(grid.xs)
    blocks: list[Block] = []
    for r0 in range(0, nr, block_tiles):
        for c0 in range(0, nc, block_tiles):
            r1, c1 = min(r0 + block_tiles, nr), min(c0 + block_tiles, nc)
            tiles = tuple(r * nc + c for r in range(r0, r1) for c in range(c0, c1))
            first, last = grid[tiles[0]], grid[tiles[-1]]
            blocks.append(
                Block(len(blocks), (r0, r1), (c0, c1), tiles, (first.y0, first.x0, last.y1, last.x1))
            )
    return blocks


def rects_touch(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def touching(rects: np.ndarray, rect: Rect) -> np.ndarray:
    """Indices of the (n, 4) (y0, x0, y1, x1) ``rects`` that share pixels with ``rect``."""
    return np.flatnonzero(
        (rects[:, 0] < rect[2]) & (rect[0] < rects[:, 2]) & (rects[:, 1] < rect[3]) & (rect[1] < rects[:, 3])
    )


@dataclass
class BlockCells:
    """The cells one block found (global coordinates, single-process order).

    Attributes:
        gids: (N,) int64 global ids; cells: N :class:`Candidate`; edges: (E, 2) int64 gid pairs judged
        copies by ``deduplicate`` inside this block; stats: pipeline counts.
    """

    block: int
    gids: np.ndarray
    cells: list[Candidate]
    edges: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    stats: dict[str, int] = field(default_factory=dict)

    def bboxes(self) -> np.ndarray:
        return np.array([c.bbox() for c in self.cells], np.int64).reshape(-1, 4)

    def subset(self, keep: np.ndarray) -> BlockCells:
        idx = np.flatnonzero(keep)
        return BlockCells(self.block, self.gids[idx], [self.cells[i] for i in idx])


def block_cells(
    net: SegmentationModel,
    dev: torch.device,
    source: ImageSource,
    norm: Normalizer,
    block: Block,
    grid: GridTiles,
    params: SegmentParams,
) -> BlockCells:
    """Segment the tiles of ``block`` (filled ``params`` as in :func:`cellsam.inference.segment.segment_prepared`;
    the whole-cell channel inverted when ``params.polarity`` is ``"inverted"``) and find the copies among
    its cells."""
    from cellsam.inference.polarity import invert_whole_cell
    from cellsam.inference.segment import tile_candidates

    oy, ox = block.rect[:2]
    image = prepare_window(source, norm, block.rect)
    if params.polarity == "inverted":
        image = invert_whole_cell(image)
    local = [
        replace(t, y0=t.y0 - oy, y1=t.y1 - oy, x0=t.x0 - ox, x1=t.x1 - ox)
        for t in (grid[i] for i in block.tiles)
    ]
    cores = None if params.decode_copies else [
        (y0 - oy, y1 - oy, x0 - ox, x1 - ox) for y0, y1, x0, x1 in (grid.core(i) for i in block.tiles)
    ]
    stats = {"tiles": len(local), "boxes": 0, "decoded": 0, "iou_passed": 0}
    bs = params.batch_size
    cells: list[Candidate] = []
    for i0 in range(0, len(local), bs):
        cells += tile_candidates(
            net, dev, local, list(range(i0, min(i0 + bs, len(local)))), image, params, stats, cores
        )
    gids, count = [], dict.fromkeys(block.tiles, 0)
    for c in cells:
        c.tile = block.tiles[c.tile]
        c.y0, c.x0 = c.y0 + oy, c.x0 + ox
        c.box = (c.box + np.array([ox, oy, ox, oy], np.float32)).astype(np.float32)
        if count[c.tile] >= 1 << GID_SHIFT:
            raise ValueError(f"more than {1 << GID_SHIFT} cells in one tile")
        gids.append((c.tile << GID_SHIFT) + count[c.tile])
        count[c.tile] += 1
    stats["masks"] = len(cells)
    out = BlockCells(block.index, np.array(gids, np.int64), cells, stats=stats)
    out.edges = copy_edges(out, None, grid)
    return out


def copy_edges(a: BlockCells, b: BlockCells | None, grid: GridTiles) -> np.ndarray:
    """(E, 2) gid pairs that ``deduplicate`` would not keep together (copies across tiles, or
    near-identical in one tile), among pairs of cells of ``a`` (and ``b``: across the two)."""
    ba = a.bboxes()
    bb = ba if b is None else b.bboxes()
    other = a if b is None else b
    hit = (
        (ba[:, None, 0] < bb[None, :, 2])
        & (bb[None, :, 0] < ba[:, None, 2])
        & (ba[:, None, 1] < bb[None, :, 3])
        & (bb[None, :, 1] < ba[:, None, 3])
    )
    if b is None:
        hit = np.triu(hit, k=1)
    edges = [
        (a.gids[i], other.gids[j])
        for i, j in zip(*np.nonzero(hit), strict=True)
        if len(deduplicate([a.cells[i], other.cells[j]], grid, grid.shape)) < 2
    ]
    return np.array(edges, np.int64).reshape(-1, 2)


def select(cells: BlockCells, rect: Rect, gids: np.ndarray | None = None) -> BlockCells:
    """The cells whose mask box meets ``rect`` (and whose gid is in ``gids`` when given)."""
    if not cells.cells:
        return cells.subset(np.zeros(0, bool))
    bb = cells.bboxes()
    keep = (bb[:, 0] < rect[2]) & (rect[0] < bb[:, 2]) & (bb[:, 1] < rect[3]) & (rect[1] < bb[:, 3])
    if gids is not None:
        keep &= np.isin(cells.gids, gids)
    return cells.subset(keep)


def scores(cells: BlockCells) -> np.ndarray:
    """(N,) float64 box scores of the block's cells."""
    return np.array([c.score for c in cells.cells], np.float64)


def above(cells: BlockCells, floor: float) -> BlockCells:
    """The cells scoring at least ``floor`` (the image's relative box threshold,
    :func:`~cellsam.inference.tiling.score_floor` of every block's scores), with the copy edges among them:
    whether two cells are copies does not depend on the others, so this is the single-process rule."""
    out = cells.subset(scores(cells) >= floor)
    out.edges = cells.edges[np.isin(cells.edges, out.gids).all(axis=1)]
    out.stats = dict(cells.stats, confident=len(out.cells))
    return out


def pick(cells: BlockCells, gids: np.ndarray) -> BlockCells:
    """The cells with the given gids."""
    return cells.subset(np.isin(cells.gids, gids))


def resolve(
    own: BlockCells, extras: Sequence[BlockCells], components: Sequence[np.ndarray], grid: GridTiles
) -> np.ndarray:
    """Run ``deduplicate`` on each component (gids, ascending); returns the kept gids."""
    pool = {int(g): c for part in (own, *extras) for g, c in zip(part.gids, part.cells, strict=True)}
    kept: list[int] = []
    for comp in components:
        members = [int(g) for g in np.sort(comp)]
        keep = deduplicate([pool[g] for g in members], grid, grid.shape)
        kept += [members[i] for i in keep]
    return np.array(sorted(kept), np.int64)


@dataclass
class FinalCells:
    """Cells that survive the label-image cleaning, with their final masks.

    Attributes:
        gids (N,), scores (N,), ious (N,); boxes (N, 4) xyxy detector boxes; cells: N (y0, x0, mask) crops.
    """

    gids: np.ndarray
    scores: np.ndarray
    ious: np.ndarray
    boxes: np.ndarray
    cells: list[tuple[int, int, np.ndarray]]


def final_cells(own: BlockCells, neighbours: Sequence[BlockCells], rect: Rect, min_area: int) -> FinalCells:
    """Arg-max merge (in global order: score descending, then gid) of ``own`` kept cells with the
    ``neighbours``' kept cells, on ``rect``; each own cell keeps its largest won component if it has at
    least ``min_area`` pixels, as :func:`~cellsam.ops.masks.clean_labels` does on the whole image."""
    y0, x0, y1, x1 = rect
    pool = [(g, c, True) for g, c in zip(own.gids, own.cells, strict=True)]
    pool += [(g, c, False) for nb in neighbours for g, c in zip(nb.gids, nb.cells, strict=True)]
    pool.sort(key=lambda t: (-t[1].score, int(t[0])))
    crops = []
    for _, c, _ in pool:  # clip every crop to rect
        h, w = c.mask.shape
        cy0, cx0, cy1, cx1 = max(c.y0, y0), max(c.x0, x0), min(c.y0 + h, y1), min(c.x0 + w, x1)
        sy, sx = slice(cy0 - c.y0, max(cy1, cy0) - c.y0), slice(cx0 - c.x0, max(cx1, cx0) - c.x0)
        crops.append((cy0 - y0, cx0 - x0, c.mask[sy, sx], c.logits[sy, sx]))
    labels = merge_by_argmax(crops, (y1 - y0, x1 - x0))
    out: list[tuple[int, Candidate, np.ndarray, int, int]] = []
    for k, (g, c, mine) in enumerate(pool):
        if not mine:
            continue
        h, w = c.mask.shape
        won = (labels[c.y0 - y0 : c.y0 - y0 + h, c.x0 - x0 : c.x0 - x0 + w] == k + 1).astype(np.int32)
        clean, old = clean_labels(won, min_area=min_area)
        if old.size == 0:
            continue
        m = clean > 0
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        r0, r1, q0, q1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        out.append((int(g), c, np.ascontiguousarray(m[r0:r1, q0:q1]), c.y0 + r0, c.x0 + q0))
    return FinalCells(
        gids=np.array([o[0] for o in out], np.int64),
        scores=np.array([o[1].score for o in out], np.float32),
        ious=np.array([o[1].iou for o in out], np.float32),
        boxes=np.array([o[1].box for o in out], np.float32).reshape(-1, 4),
        cells=[(o[3], o[4], o[2]) for o in out],
    )


def areas(fin: FinalCells) -> np.ndarray:
    """(N,) int64 pixel counts of the block's final cells."""
    return np.array([int(m.sum()) for _, _, m in fin.cells], np.int64)


def at_least(fin: FinalCells, floor: float) -> FinalCells:
    """The final cells of at least ``floor`` pixels (the image's :func:`~cellsam.ops.masks.area_floor` over
    every block's final cells, as :func:`~cellsam.ops.masks.clean_labels` takes it over the whole image)."""
    keep = areas(fin) >= floor
    return FinalCells(gids=fin.gids[keep], scores=fin.scores[keep], ious=fin.ious[keep], boxes=fin.boxes[keep],
                      cells=[c for c, k in zip(fin.cells, keep, strict=True) if k])


def paint(region: Rect, parts: Sequence[tuple[FinalCells, np.ndarray]], dtype: Any = np.uint32) -> np.ndarray:
    """(h, w) label image of ``region`` from final cells and their label ids (one array per part)."""
    y0, x0, y1, x1 = region
    out = np.zeros((y1 - y0, x1 - x0), dtype)
    for fin, ids in parts:
        for (cy, cx, m), lab in zip(fin.cells, ids, strict=True):
            h, w = m.shape
            ay0, ax0, ay1, ax1 = max(cy, y0), max(cx, x0), min(cy + h, y1), min(cx + w, x1)
            if ay0 >= ay1 or ax0 >= ax1:
                continue
            sub = m[ay0 - cy : ay1 - cy, ax0 - cx : ax1 - cx]
            out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0][sub] = lab
    return out
