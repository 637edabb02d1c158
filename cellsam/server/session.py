"""The model, loaded once, and the per-image caches that make prompts fast.

An image is split into tiles (25 % overlap, zero-padded like :func:`cellsam.segment`) at the image's
scale (:meth:`ModelSession.scale`): the tile side its last Segment all ended at, else the one the
model's size model picks (``diameter="auto"``), else the model's own ``cfg.tile_size``; each tile is
resized to the model's input and embedded once, on first use, by a
:class:`~cellsam.inference.predictor.Predictor` kept in an LRU cache bounded by count and bytes.
A prompt then runs only the prompt encoder and mask decoder on the tile that holds it best, so a click
on a cell is decoded with the cell at about the size the model was trained on.
Normalised images ((3, H, W) in [0, 1]) are cached the same way. All model calls hold one lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torchvision.ops import nms

from cellsam.inference.predictor import Predictor
from cellsam.inference.tiling import Tile, extract_tile, holding_tiles, in_core, tile_cores, tile_grid
from cellsam.models.protocol import PromptableModel, inference_defaults
from cellsam.ops.masks import clean_cell_mask, merge_by_argmax

TILE_OVERLAP = 0.25
NMS_IOU = 0.7  # detect(): boxes overlapping a better one by more than this are dropped


def clip_box(box: Sequence[float] | np.ndarray, shape: tuple[int, int]) -> tuple[float, float, float, float] | None:
    """An xyxy box clipped to an image of ``shape`` (H, W): a box dragged past the edge keeps its part in
    the image. None when it is not finite, not x1 > x0 and y1 > y0, or less than a pixel stays inside."""
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = shape
    if not np.isfinite([x0, y0, x1, y1]).all() or x1 <= x0 or y1 <= y0:
        return None
    x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
    y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
    return (x0, y0, x1, y1) if x1 - x0 >= 1 and y1 - y0 >= 1 else None


K = TypeVar("K", bound=Hashable)


class LRUCache(Generic[K]):
    """Least-recently-used cache bounded by item count and by total bytes (``size_of(value)``)."""

    def __init__(self, *, max_items: int, max_bytes: int, size_of: Callable[[Any], int]) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"cache bounds must be >= 1, got max_items={max_items}, max_bytes={max_bytes}")
        self.max_items, self.max_bytes, self.size_of = max_items, max_bytes, size_of
        self._d: OrderedDict[K, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> Any:
        hit = self._d.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return hit[0]

    def put(self, key: K, value: Any) -> None:
        if key in self._d:
            self.bytes -= self._d.pop(key)[1]
        size = int(self.size_of(value))
        self._d[key] = (value, size)
        self.bytes += size
        while len(self._d) > 1 and (len(self._d) > self.max_items or self.bytes > self.max_bytes):
            self.bytes -= self._d.popitem(last=False)[1][1]

    def drop(self, pred: Callable[[K], bool]) -> None:
        for k in [k for k in self._d if pred(k)]:
            self.bytes -= self._d.pop(k)[1]

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)


def _predictor_bytes(p: Predictor) -> int:
    f = p._features
    total = 0
    for t in (getattr(f, "trunk", None), getattr(f, "embedding", None), p._input):
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


@dataclass
class CellProposal:
    """One cell from the model: its mask on a window (y0, x0) and logits there."""

    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool
    logits: np.ndarray  # (h, w) float32
    score: float


# Default bounds of the embedding cache (a vit_cpu tile embedding is 0.5 MB, a vit_b one 4 MB).
CACHE_ITEMS = 1024
CACHE_BYTES = 1 << 30


class ModelSession:
    """Owns the model and the caches; safe to call from several threads."""

    def __init__(
        self, model: PromptableModel, *, name: str = "model", cache_items: int = CACHE_ITEMS,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.lock = threading.RLock()
        # keys are tuples whose first item is the image's id (see forget)
        self.embeddings: LRUCache[tuple[Hashable, ...]] = LRUCache(
            max_items=cache_items, max_bytes=cache_bytes, size_of=_predictor_bytes
        )
        self.images: LRUCache[tuple[Hashable, ...]] = LRUCache(
            max_items=12, max_bytes=max(cache_bytes // 2, 1), size_of=lambda a: a.nbytes
        )
        self.scales: dict[tuple[Hashable, ...], int] = {}  # image key -> tile side of its prompts
        self.inverted: dict[tuple[Hashable, ...], bool] = {}  # image key -> polarity of its prompts
        self.generation = 0
        self.set_model(model, name=name)

    def set_model(self, model: PromptableModel, *, name: str) -> None:
        """Use another model (e.g. a fine-tuned one); every cached embedding is dropped."""
        with self.lock:
            model.eval()
            self.model, self.name = model, name
            self.tile_size = int(getattr(model.cfg, "tile_size", model.img_size))
            self.generation += 1
            self.embeddings.clear()
            self.scales.clear()
            self.inverted.clear()

    # ------------------------------------------------------------------ images and tiles
    def prepared(self, key: tuple[Hashable, ...], load: Callable[[], np.ndarray]) -> np.ndarray:
        """The normalised (3, H, W) image for ``key`` (computed by ``load`` on a miss)."""
        with self.lock:
            img = self.images.get(key)
            if img is None:
                img = load()
                self.images.put(key, img)
            return img

    def forget(self, image_id: Hashable) -> None:
        """Drop cached images, embeddings and the scale of one image (channels changed, image deleted)."""
        with self.lock:
            self.images.drop(lambda k: k[0] == image_id)
            self.embeddings.drop(lambda k: k[0] == image_id)
            for k in [k for k in self.scales if k[0] == image_id]:
                del self.scales[k]
            for k in [k for k in self.inverted if k[0] == image_id]:
                del self.inverted[k]

    def scale(self, key: Hashable, image: np.ndarray) -> int:
        """The tile side (input pixels) that prompts on ``image`` use: the one its last
        :meth:`segment_all` ended at, else the size model's choice (``diameter="auto"``; the model's own
        tile without a size model) on the image as the model sees it (:meth:`view`). Remembered per image key."""
        k = _as_tuple(key)
        with self.lock:
            tile = self.scales.get(k)
            if tile is None:
                from cellsam.config import AUTO
                from cellsam.inference.scale import choose_scale

                tile, _ = choose_scale(self.model, self.view(key, image), self.tile_size, AUTO,
                                       self.model.pixel_mean.device)
                self.scales[k] = tile
            return tile

    def view(self, key: Hashable, image: np.ndarray) -> np.ndarray:
        """The normalised image ``key`` as the model sees it: its whole-cell channel inverted when its last
        :meth:`segment_all` did so, else when ``polarity="auto"`` would (:mod:`cellsam.inference.polarity`,
        decided once per image key)."""
        from cellsam.config import AUTO
        from cellsam.inference.polarity import auto_inverts, invert_whole_cell

        k = _as_tuple(key)
        with self.lock:
            inverted = self.inverted.get(k)
            if inverted is None:
                inverted = auto_inverts(self.model, image, self.tile_size, AUTO, self.model.pixel_mean.device,
                                        inference_defaults(self.model).box_threshold)
                self.inverted[k] = inverted
            if not inverted:
                return image
            # one inverted copy per image, not one per tile embedded (dropped with the image by forget)
            view = self.images.get((*k, "inverted"))
            if view is None:
                view = invert_whole_cell(image)
                self.images.put((*k, "inverted"), view)
            return view

    def known_scale(self, key: Hashable) -> int | None:
        """The scale remembered for the image ``key`` (:meth:`scale`, :meth:`set_scale`), or None."""
        with self.lock:
            return self.scales.get(_as_tuple(key))

    def set_scale(self, key: Hashable, tile_size: int) -> None:
        """Decode later prompts on the image ``key`` at ``tile_size`` (e.g. where its segmentation ended)."""
        if tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {tile_size}")
        with self.lock:
            self.scales[_as_tuple(key)] = int(tile_size)

    def tiles(self, shape: tuple[int, int], tile_size: int | None = None) -> list[Tile]:
        """The tiles of an image of ``shape`` at ``tile_size`` (None: the model's own)."""
        return tile_grid(shape, tile_size=tile_size or self.tile_size, overlap=TILE_OVERLAP)

    def _predictor(self, key: Hashable, image: np.ndarray, tiles: list[Tile], i: int,
                   tile_size: int | None = None) -> Predictor:
        size = tile_size or self.tile_size
        full = (*_as_tuple(key), i, size, self.generation)
        p = self.embeddings.get(full)
        if p is None:
            p = Predictor(self.model)
            # the tile side is the scale (the size model's, or the one Segment all ended at): no warning
            p.set_image(extract_tile(self.view(key, image), tiles[i], size), channel_axis=0, normalize=False,
                        check_scale=False)
            self.embeddings.put(full, p)
        return p

    @staticmethod
    def best_tile(tiles: Sequence[Tile], box: tuple[float, float, float, float]) -> int:
        """Index of the tile that holds the (x0, y0, x1, y1) box with the widest margin (or most of it)."""
        return int(holding_tiles(np.asarray(box, np.float64), tiles)[0])

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def predict(
        self,
        key: Hashable,
        image: np.ndarray,
        *,
        points: list[tuple[float, float]] | None = None,
        point_labels: list[int] | None = None,
        box: tuple[float, float, float, float] | None = None,
        tile_size: int | None = None,
    ) -> CellProposal:
        """One cell from point and / or box prompts (x, y pixels of the whole image).

        Args:
            image: (3, H, W) normalised image. points: (P, 2) xy; point_labels: (P,) 1 = inside,
            0 = outside. box: xyxy. tile_size: the scale (None: :meth:`scale` of ``key``).
        Returns:
            the cleaned mask (largest island, holes filled) on its tile window.
        Raises:
            ValueError: no prompt, no positive point and no box, or an empty mask.
        """
        pts = np.asarray(points or [], np.float32).reshape(-1, 2)
        lab = np.asarray(point_labels or [], np.int64).reshape(-1)
        if pts.shape[0] != lab.shape[0]:
            raise ValueError(f"{pts.shape[0]} points but {lab.shape[0]} point labels")
        if box is None and not (lab == 1).any():
            raise ValueError("give a box or at least one positive point (inside the cell)")
        h, w = image.shape[1:]
        for x, y in pts:
            if not (-1 <= x <= w + 1 and -1 <= y <= h + 1):
                raise ValueError(f"point ({x:g}, {y:g}) lies outside the {w}x{h} image")
        if box is not None:
            clipped = clip_box(box, (h, w))
            if clipped is None:
                raise ValueError(f"the box {tuple(box)} needs x1 > x0, y1 > y0 and at least a pixel inside the "
                                 f"{w}x{h} image")
            region = clipped
        else:
            pos = pts[lab == 1]
            region = (float(pos[:, 0].min()), float(pos[:, 1].min()), float(pos[:, 0].max()), float(pos[:, 1].max()))
        with self.lock:
            size = tile_size or self.scale(key, image)
            tiles = self.tiles((h, w), size)
            i = self.best_tile(tiles, region)
            t = tiles[i]
            p = self._predictor(key, image, tiles, i, size)
            off = np.array([t.x0, t.y0], np.float32)
            kw: dict[str, Any] = {}
            if pts.shape[0]:
                kw["point_coords"], kw["point_labels"] = pts - off, lab
            if box is not None:
                kw["box"] = np.asarray(region, np.float32) - np.tile(off, 2)
            multimask = box is None and pts.shape[0] == 1
            logits, scores, _ = p.predict(**kw, multimask_output=multimask, return_logits=True)
        k = int(np.argmax(scores))
        lo = logits[k][: t.y1 - t.y0, : t.x1 - t.x0].astype(np.float32)
        mask = clean_cell_mask(lo)
        if not mask.any() or (box is None and not _holds_a_click(mask, pts[lab == 1] - off)):
            raise ValueError("the model found no cell there; add a box or more points")
        return CellProposal(t.y0, t.x0, mask, lo, float(scores[k]))

    @torch.no_grad()
    def detect(self, key: Hashable, image: np.ndarray, *, box_threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
        """CellFinder boxes over the whole image: (N, 4) xyxy float32 and (N,) scores, best first.

        Tiles are run one by one (each embedding cached); a box is kept by the tile whose core
        (:func:`~cellsam.inference.tiling.tile_cores`, as :func:`cellsam.segment`) holds its centre, then
        near-duplicates (box IoU > 0.7) are removed by non-maximum suppression.
        """
        h, w = image.shape[1:]
        all_boxes, all_scores = [], []
        with self.lock:
            size = self.scale(key, image)
            tiles = self.tiles((h, w), size)
            cores = tile_cores(tiles, size)
            for i, t in enumerate(tiles):
                boxes, scores = self._predictor(key, image, tiles, i, size).detect(box_threshold)
                boxes = boxes + np.array([t.x0, t.y0, t.x0, t.y0], np.float32)
                boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
                boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
                own = in_core(boxes, cores[i])
                all_boxes.append(boxes[own])
                all_scores.append(scores[own])
        boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4), np.float32)
        scores = np.concatenate(all_scores) if all_scores else np.zeros((0,), np.float32)
        order = np.argsort(-scores, kind="stable")
        boxes, scores = boxes[order].astype(np.float32), scores[order].astype(np.float32)
        rank = torch.arange(len(order), 0, -1, dtype=torch.float32)  # ties keep the stable order above
        keep = nms(torch.from_numpy(boxes), rank, NMS_IOU).numpy()
        return boxes[keep], scores[keep]

    @torch.no_grad()
    def decode_boxes(self, key: Hashable, image: np.ndarray, boxes: np.ndarray) -> list[CellProposal]:
        """One proposal per box (N, 4) xyxy, each clipped to the image (:func:`clip_box`); boxes wholly
        outside it, degenerate ones and those whose mask comes out empty are skipped."""
        h, w = image.shape[1:]
        out: list[CellProposal] = []
        with self.lock:
            size = self.scale(key, image)
            tiles = self.tiles((h, w), size)
            clipped = [clip_box(b, (h, w)) for b in np.asarray(boxes, np.float32).reshape(-1, 4)]
            boxes = np.array([b for b in clipped if b is not None], np.float32).reshape(-1, 4)  # in the image
            groups: dict[int, list[int]] = {}
            for j, b in enumerate(boxes):
                groups.setdefault(self.best_tile(tiles, tuple(b)), []).append(j)
            for i, idx in groups.items():
                t = tiles[i]
                p = self._predictor(key, image, tiles, i, size)
                local = boxes[idx] - np.array([t.x0, t.y0, t.x0, t.y0], np.float32)
                logits, scores, _ = p.predict(box=local, multimask_output=False, return_logits=True)
                for n in range(len(idx)):
                    lo = logits[n, 0][: t.y1 - t.y0, : t.x1 - t.x0].astype(np.float32)
                    mask = clean_cell_mask(lo)
                    if mask.any():
                        out.append(CellProposal(t.y0, t.x0, mask, lo, float(scores[n, 0])))
        return out

    def segment_all(self, image: np.ndarray, key: Hashable | None = None, **kwargs: Any) -> Any:
        """:func:`cellsam.segment` on a normalised (3, H, W) image with this session's model; with ``key``,
        later prompts on that image use the scale the segmentation ended at (:meth:`scale`)."""
        from cellsam.inference.segment import segment

        with self.lock:
            seg = segment(image, self.model, channel_axis=0, normalize=False, **kwargs)
            if key is not None and not isinstance(seg, list) and seg.tile_size:
                self.set_scale(key, seg.tile_size)
                self.inverted[_as_tuple(key)] = seg.inverted
            return seg


def _as_tuple(key: Hashable) -> tuple[Hashable, ...]:
    """Cache keys are tuples whose first item is the image's id (see :meth:`ModelSession.forget`)."""
    return tuple(key) if isinstance(key, tuple) else (key,)


def proposals_to_labels(props: list[CellProposal], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int32 labels 1..N from proposals (overlaps resolved by the highest logit)."""
    cells = [(p.y0, p.x0, p.mask, np.where(p.mask, p.logits, -np.inf).astype(np.float32)) for p in props]
    return merge_by_argmax(cells, shape)


def _holds_a_click(mask: np.ndarray, clicks: np.ndarray) -> bool:
    """Whether the (h, w) ``mask`` covers one of the (P, 2) xy ``clicks`` (pixels of its window): a mask
    beside the clicked point is a neighbour's, not the clicked cell."""
    h, w = mask.shape
    for x, y in np.asarray(clicks, np.float64).reshape(-1, 2):
        ix, iy = int(np.floor(x)), int(np.floor(y))
        if 0 <= iy < h and 0 <= ix < w and mask[iy, ix]:
            return True
    return False
