"""Tiling of large images and stitching of the cells found in overlapping tiles.

Grid: square tiles of ``tile_size``; along each axis the fewest tiles whose stride is at most
``tile_size - round(overlap * tile_size)``, spread evenly from the image's start to its end (so the
real overlap is at least the requested one). Every tile lies fully inside the image unless the image
is smaller than one tile along that axis (then one zero-padded tile).

Ownership (:func:`tile_cores`): before any mask is decoded, a tile keeps only the detector boxes whose
centre lies in its *core*, the part of the image closer to this tile than to its neighbours (split at
the middle of each overlap), grown by ``band`` (default ``tile_size / 32``) on inner sides. A cell
seen by two tiles is then decoded once, by the tile that holds it farthest from its borders, unless
its boxes' centres fall within the band of the split line (then both decode it and stitching removes
the copy). With 25% overlap a cell whose centre is in a tile's core is at least ``overlap / 2 -
band`` pixels from that tile's inner edges.

Stitching (:func:`deduplicate`): every tile reports its cells as :class:`Candidate` crops in image
coordinates. Two passes remove the copies of one cell:

1. inside one tile, near-identical detections (mask IoU >= ``same_tile_iou``, default 0.8; CellFinder
   has no NMS) keep the higher box score;
2. across overlapping tiles, two cells are the same cell when their mask IoU >= ``match_iou``
   (default 0.3) or when the smaller one lies at least ``containment`` (default 0.5) inside the other
   (a cell cut by a tile border is a small part of its complete copy, so its IoU can be small).
   Of each group of copies the one farthest from its tile's inner borders (edges not on the image
   border) is kept; ties go to the higher box score. A cell without a match is kept, also when it
   touches an inner border.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MATCH_IOU = 0.3
CONTAINMENT = 0.5
SAME_TILE_IOU = 0.8
SCORE_QUANTILE = 0.9


@dataclass(frozen=True)
class Tile:
    """A window ``[y0:y1, x0:x1]`` of the image (y1 - y0 <= tile_size where the image is smaller)."""

    y0: int
    x0: int
    y1: int
    x1: int


@dataclass
class Candidate:
    """One cell found in one tile, in image coordinates.

    Attributes:
        tile: index of the tile in the grid.
        y0, x0: top-left corner of the crop window.
        mask: (h, w) bool cleaned mask on the window; logits: (h, w) float32 mask logits.
        box: (4,) float xyxy detector box in image pixels.
        score: detector box score; iou: predicted mask IoU.
    """

    tile: int
    y0: int
    x0: int
    mask: np.ndarray
    logits: np.ndarray
    box: np.ndarray
    score: float
    iou: float

    def bbox(self) -> tuple[int, int, int, int]:
        """Tight (y0, x0, y1, x1) of the mask in image pixels (exclusive end)."""
        ys = np.flatnonzero(self.mask.any(axis=1))
        xs = np.flatnonzero(self.mask.any(axis=0))
        return (
            self.y0 + int(ys[0]),
            self.x0 + int(xs[0]),
            self.y0 + int(ys[-1]) + 1,
            self.x0 + int(xs[-1]) + 1,
        )


def score_floor(scores: np.ndarray, rel: float) -> float:
    """The relative box threshold: ``rel`` times the :data:`SCORE_QUANTILE` quantile of ``scores`` (N,),
    the box scores of all the cells one image's tiles found (0 when ``rel`` is 0 or there are none)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    return rel * float(np.quantile(scores, SCORE_QUANTILE)) if rel > 0 and scores.size else 0.0


def confident(cands: Sequence[Candidate], rel: float) -> list[Candidate]:
    """The candidates whose box score is at least :func:`score_floor` of all their scores (``rel`` in
    [0, 1); 0 keeps every one). ``cands``: the cells of one whole image, before stitching."""
    floor = score_floor(np.array([c.score for c in cands]), rel)
    return [c for c in cands if c.score >= floor]


def _starts(length: int, tile_size: int, stride: int) -> list[int]:
    if length <= tile_size:
        return [0]
    n = -(-(length - tile_size) // stride) + 1  # fewest tiles whose stride is <= the nominal one
    return [int(round(v)) for v in np.linspace(0, length - tile_size, n)]


def tile_grid(shape: tuple[int, int], *, tile_size: int = 512, overlap: float = 0.25) -> list[Tile]:
    """Tiles covering an (H, W) image, row-major.

    Args:
        shape: (H, W).
        tile_size: side of a square tile in image pixels.
        overlap: fraction of ``tile_size`` shared by neighbouring tiles, in [0, 1).
    """
    if not isinstance(tile_size, (int, np.integer)) or tile_size < 16:
        raise ValueError(f"tile_size must be an integer >= 16, got {tile_size!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile_overlap must be in [0, 1), got {overlap}")
    h, w = shape
    stride = max(1, int(tile_size) - int(round(overlap * tile_size)))
    return [
        Tile(y, x, min(y + tile_size, h), min(x + tile_size, w))
        for y in _starts(h, tile_size, stride)
        for x in _starts(w, tile_size, stride)
    ]


def axis_cores(starts: Sequence[int], tile_size: int, band: float) -> list[tuple[float, float]]:
    """Per tile start along one axis, the half-open core ``[lo, hi)``: split at the middle of each overlap,
    grown by ``band``; the first / last tile's core extends to -inf / +inf."""
    out = []
    for k, s in enumerate(starts):
        lo = -np.inf if k == 0 else (starts[k - 1] + tile_size + s) / 2 - band
        hi = np.inf if k == len(starts) - 1 else (s + tile_size + starts[k + 1]) / 2 + band
        out.append((float(lo), float(hi)))
    return out


def default_band(tile_size: int) -> float:
    return tile_size / 32


def tile_cores(
    tiles: Sequence[Tile], tile_size: int, band: float | None = None
) -> list[tuple[float, float, float, float]]:
    """(y_lo, y_hi, x_lo, x_hi) core of each tile of a full :func:`tile_grid` (see the module docstring).

    A box belongs to a tile when its centre (cy, cx) has ``y_lo <= cy < y_hi`` and ``x_lo <= cx < x_hi``.
    """
    band = default_band(tile_size) if band is None else float(band)
    ys, xs = sorted({t.y0 for t in tiles}), sorted({t.x0 for t in tiles})
    cy = dict(zip(ys, axis_cores(ys, tile_size, band), strict=True))
    cx = dict(zip(xs, axis_cores(xs, tile_size, band), strict=True))
    return [(*cy[t.y0], *cx[t.x0]) for t in tiles]


def in_core(boxes: np.ndarray, core: tuple[float, float, float, float]) -> np.ndarray:
    """(N,) bool: whether the centres of the (N, 4) xyxy ``boxes`` (image pixels) lie in ``core``."""
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    return (cy >= core[0]) & (cy < core[1]) & (cx >= core[2]) & (cx < core[3])


def holding_tiles(boxes: np.ndarray, tiles: Sequence[Tile]) -> np.ndarray:
    """The tile that holds each box best: (N, 4) xyxy boxes (image pixels) -> (N,) int64 tile indices.

    Among the tiles that contain the whole box, the one with the widest margin between box and tile edge;
    when none contains it, the one that holds the largest part of it. Ties go to the first tile.
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)[:, None, :]  # (N, 1, 4)
    t = np.array([[tl.x0, tl.y0, tl.x1, tl.y1] for tl in tiles], np.float64).reshape(-1, 4)  # (T, 4)
    margin = np.minimum.reduce([b[..., 0] - t[:, 0], b[..., 1] - t[:, 1], t[:, 2] - b[..., 2],
                                t[:, 3] - b[..., 3]])  # (N, T)
    inter = (np.clip(np.minimum(b[..., 2], t[:, 2]) - np.maximum(b[..., 0], t[:, 0]), 0, None)
             * np.clip(np.minimum(b[..., 3], t[:, 3]) - np.maximum(b[..., 1], t[:, 1]), 0, None))
    inside = margin >= 0
    by_margin = np.where(inside, margin, -np.inf).argmax(axis=1)
    return np.where(inside.any(axis=1), by_margin, inter.argmax(axis=1)).astype(np.int64)


def extract_tile(image: np.ndarray, tile: Tile, tile_size: int) -> np.ndarray:
    """(C, H, W) image -> (C, tile_size, tile_size) float32 window, zero-padded at the bottom/right."""
    out = np.zeros((image.shape[0], tile_size, tile_size), np.float32)
    out[:, : tile.y1 - tile.y0, : tile.x1 - tile.x0] = image[:, tile.y0 : tile.y1, tile.x0 : tile.x1]
    return out


def spread_tiles(image: np.ndarray, tile_size: int, max_tiles: int) -> list[np.ndarray]:
    """At most ``max_tiles`` non-overlapping ``tile_size`` tiles of a (C, H, W) image, spread evenly over
    it (zero-padded at its border), constant ones left out: (C, tile_size, tile_size) arrays."""
    tiles = tile_grid(image.shape[1:], tile_size=tile_size, overlap=0.0)
    if len(tiles) > max_tiles:
        tiles = [tiles[int(i)] for i in np.linspace(0, len(tiles) - 1, max_tiles).round()]
    crops = [extract_tile(image, t, tile_size) for t in tiles]
    return [c for c in crops if float(c.std()) > 1e-3]


def inner_margin(bbox: tuple[int, int, int, int], tile: Tile, shape: tuple[int, int]) -> float:
    """Distance in pixels from a (y0, x0, y1, x1) box to the nearest edge of ``tile`` that is not on the
    image border (``inf`` when the tile has no inner edge, i.e. it is the whole image)."""
    h, w = shape
    y0, x0, y1, x1 = bbox
    d = [float("inf")]
    if tile.y0 > 0:
        d.append(y0 - tile.y0)
    if tile.x0 > 0:
        d.append(x0 - tile.x0)
    if tile.y1 < h:
        d.append(tile.y1 - y1)
    if tile.x1 < w:
        d.append(tile.x1 - x1)
    return float(min(d))


def _overlap(a: Candidate, ba: tuple[int, int, int, int], b: Candidate, bb: tuple[int, int, int, int]) -> int:
    """Number of pixels shared by the masks of two candidates."""
    y0, x0 = max(ba[0], bb[0]), max(ba[1], bb[1])
    y1, x1 = min(ba[2], bb[2]), min(ba[3], bb[3])
    if y0 >= y1 or x0 >= x1:
        return 0
    ma = a.mask[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]
    mb = b.mask[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    return int(np.count_nonzero(ma & mb))


def _bbox_hits(ia: list[int], ib: list[int], bbox: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """(len(ia), len(ib)) bool: whether the (y0, x0, y1, x1) boxes of the two lists intersect."""
    ba = np.array([bbox[i] for i in ia]).reshape(-1, 4)
    bb = np.array([bbox[j] for j in ib]).reshape(-1, 4)
    return (
        (ba[:, None, 0] < bb[None, :, 2])
        & (bb[None, :, 0] < ba[:, None, 2])
        & (ba[:, None, 1] < bb[None, :, 3])
        & (bb[None, :, 1] < ba[:, None, 3])
    )


def _tiles_touch(a: Tile, b: Tile) -> bool:
    return a.y0 < b.y1 and b.y0 < a.y1 and a.x0 < b.x1 and b.x0 < a.x1


def deduplicate(
    cells: Sequence[Candidate],
    tiles: Sequence[Tile],
    shape: tuple[int, int],
    *,
    match_iou: float = MATCH_IOU,
    containment: float = CONTAINMENT,
    same_tile_iou: float = SAME_TILE_IOU,
) -> list[int]:
    """Indices (ascending) of the cells to keep so that each physical cell is represented once.

    Cells with empty masks are dropped. See the module docstring for the rules.
    """
    idx = [i for i, c in enumerate(cells) if c.mask.any()]
    bbox = {i: cells[i].bbox() for i in idx}
    area = {i: int(np.count_nonzero(cells[i].mask)) for i in idx}
    margin = {i: inner_margin(bbox[i], tiles[cells[i].tile], shape) for i in idx}
    by_tile: dict[int, list[int]] = {}
    for i in idx:
        by_tile.setdefault(cells[i].tile, []).append(i)

    def iou_and_cont(i: int, j: int) -> tuple[float, float]:
        inter = _overlap(cells[i], bbox[i], cells[j], bbox[j])
        if inter == 0:
            return 0.0, 0.0
        return inter / (area[i] + area[j] - inter), inter / min(area[i], area[j])

    # pass 1: near-identical detections inside one tile, best score first
    survivors: list[int] = []
    for members in by_tile.values():
        order = sorted(members, key=lambda k: -cells[k].score)
        hit = _bbox_hits(order, order, bbox)
        kept_pos: list[int] = []
        for p, i in enumerate(order):
            if all(iou_and_cont(i, order[q])[0] < same_tile_iou for q in kept_pos if hit[p, q]):
                kept_pos.append(p)
        survivors.extend(order[p] for p in kept_pos)
    surv_by_tile: dict[int, list[int]] = {}
    for i in survivors:
        surv_by_tile.setdefault(cells[i].tile, []).append(i)

    # pass 2: copies of one cell in overlapping tiles
    dup: dict[int, list[int]] = {i: [] for i in survivors}
    tile_ids = sorted(surv_by_tile)
    for a_pos, ta in enumerate(tile_ids):
        for tb in tile_ids[a_pos + 1 :]:
            if not _tiles_touch(tiles[ta], tiles[tb]):
                continue
            ia, ib = surv_by_tile[ta], surv_by_tile[tb]
            for a_i, b_i in zip(*np.nonzero(_bbox_hits(ia, ib, bbox)), strict=True):
                i, j = ia[a_i], ib[b_i]
                iou, cont = iou_and_cont(i, j)
                if iou >= match_iou or cont >= containment:
                    dup[i].append(j)
                    dup[j].append(i)
    keep: set[int] = set()
    for i in sorted(survivors, key=lambda k: (-margin[k], -cells[k].score, k)):
        if not any(j in keep for j in dup[i]):
            keep.add(i)
    return sorted(keep)
