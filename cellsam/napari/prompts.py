"""Box and click prompts on cached tile embeddings, and the label edit each prompt makes. No Qt.

:class:`PromptTool` answers prompts with :class:`cellsam.server.session.ModelSession` (the web app's
model session): the image is cut into the model's tiles, each tile is embedded once, on first use, by a
:class:`cellsam.inference.predictor.Predictor` kept in an LRU cache, and a prompt runs only the
prompt encoder and mask decoder on the tile that holds it best. An in-memory image is normalised once
(:func:`~cellsam.inference.preprocess.prepare_image`); a lazy one (dask / zarr) only on the tile a
prompt falls in (:func:`cellsam.distributed.source.prepare_window`).

:func:`cell_edit` turns a proposal into the pixels to change in a label image (a new label, or a
redraw of one); the widget applies them with napari's ``Labels.data_setitem``, so Ctrl+Z undoes them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellsam.inference.preprocess import stain_grey
from cellsam.napari.segmentation import ImageSpec, is_lazy, level0, open_image

Rect = tuple[int, int, int, int]  # (y0, x0, y1, x1), exclusive ends


@dataclass
class _Image:
    shape: tuple[int, int]
    prepared: np.ndarray | None  # (3, H, W) in [0, 1] for in-memory images
    source: Any = None  # lazy images: ImageSource + Normalizer
    norm: Any = None


@dataclass(frozen=True)
class Cell:
    """A cell from a prompt: its mask on the window at (y0, x0) of the image, and its predicted IoU."""

    y0: int
    x0: int
    mask: np.ndarray  # (h, w) bool
    score: float


class PromptTool:
    """Prompts on images registered by key; one model, one embedding cache.

    Example::

        tool = PromptTool(model)
        tool.set_image("img", data, ImageSpec())
        cell = tool.cell("img", box=(x0, y0, x1, y1))                   # or points=[(x, y)], point_labels=[1]
        edit = cell_edit(labels, cell)                                 # a new label
    """

    def __init__(self, model: Any, *, name: str = "model") -> None:
        from cellsam.server.session import ModelSession

        self.session = ModelSession(model, name=name)
        self._images: dict[Hashable, _Image] = {}

    @property
    def model(self) -> Any:
        return self.session.model

    def set_model(self, model: Any, *, name: str) -> None:
        """Use another model; every cached embedding is dropped, and every registered image too when the new
        model prepares stained colour pictures differently (:func:`~cellsam.inference.preprocess.stain_grey`):
        such images are registered again (:meth:`set_image`)."""
        if stain_grey(model) != stain_grey(self.model):
            self._images.clear()
        self.session.set_model(model, name=name)

    def has_image(self, key: Hashable) -> bool:
        return key in self._images

    def set_image(self, key: Hashable, data: Any, spec: ImageSpec, *, lazy: bool | None = None) -> None:
        """Register (or replace) the image ``key``; raises ValueError / TypeError for a bad image. A scale
        set for ``key`` (:meth:`use_scale`) is kept."""
        with self.session.lock:
            scale = self.session.known_scale(key)
            self.forget(key)
            if scale is not None:
                self.session.set_scale(key, scale)
        data = level0(data)
        lazy = is_lazy(data) if lazy is None else lazy
        source, norm = open_image(data, spec, lazy=lazy, stain=stain_grey(self.model))
        if lazy:
            self._images[key] = _Image(source.shape, None, source, norm)
        else:
            prepared = source.array  # the (3, H, W) image open_image normalised
            self._images[key] = _Image(source.shape, np.asarray(prepared))

    def forget(self, key: Hashable) -> None:
        """Drop the image ``key``, its cached embeddings and its scale."""
        self._images.pop(key, None)
        self.session.forget(key)

    def use_scale(self, key: Hashable, tile_size: int) -> None:
        """Decode prompts on ``key`` at ``tile_size`` (the scale its segmentation ended at); without it, an
        in-memory image's prompts use the size model's scale and a lazy image's the model's own (a lazy
        image's prompt is decoded on the one tile of that side that holds it best)."""
        self.session.set_scale(key, tile_size)

    def cell(
        self,
        key: Hashable,
        *,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
    ) -> Cell:
        """One cell from a box (x0, y0, x1, y1) and / or clicks ((x, y), label 1 inside / 0 outside).

        Raises:
            KeyError: no image ``key``; ValueError: no usable prompt, a prompt outside the image, or
            no cell found there (the session's messages).
        """
        img = self._images.get(key)
        if img is None:
            raise KeyError(f"no image {key!r}: choose an image layer first")
        pts = None if points is None else [(float(x), float(y)) for x, y in points]
        labs = None if point_labels is None else [int(v) for v in point_labels]
        bx = None
        if box is not None:  # a box drawn past the image's edge ends at the edge, as in the web app
            from cellsam.server.session import clip_box

            h, w = img.shape
            bx = clip_box(box, (h, w))
            if bx is None:
                raise ValueError(f"the box lies outside the {w}x{h} image (or is less than a pixel wide)")
        if img.prepared is not None:
            prop = self.session.predict(key, img.prepared, points=pts, point_labels=labs, box=bx)
            return Cell(prop.y0, prop.x0, prop.mask, prop.score)
        return self._lazy_cell(key, img, bx, pts, labs)

    def _lazy_cell(
        self, key: Hashable, img: _Image, box: tuple[float, float, float, float] | None,
        pts: list[tuple[float, float]] | None, labs: list[int] | None,
    ) -> Cell:
        """The prompt on the one grid tile that holds it best, normalised on its own (lazy images)."""
        from cellsam.distributed.blocks import GridTiles
        from cellsam.distributed.source import prepare_window
        from cellsam.server.session import TILE_OVERLAP, ModelSession

        if box is not None:
            region = box
        else:
            p = np.asarray(pts or [], np.float32).reshape(-1, 2)
            pos = p[np.asarray(labs or [], np.int64).reshape(-1) == 1]
            if pos.shape[0] == 0:
                raise ValueError("give a box or at least one positive point (inside the cell)")
            region = (float(pos[:, 0].min()), float(pos[:, 1].min()), float(pos[:, 0].max()), float(pos[:, 1].max()))
        side = self.session.known_scale(key) or self.session.tile_size  # where its Segment ended, else the model's
        grid = GridTiles(img.shape, tile_size=side, overlap=TILE_OVERLAP)
        i = ModelSession.best_tile(grid, region)
        t = grid[i]
        window = self.session.prepared(
            (key, "window", side, i), lambda: prepare_window(img.source, img.norm, (t.y0, t.x0, t.y1, t.x1))
        )
        shift = np.array([t.x0, t.y0], np.float32)
        prop = self.session.predict(
            (key, side, i),
            window,
            points=None if pts is None else [tuple(np.asarray(q, np.float32) - shift) for q in pts],
            point_labels=labs,
            box=None if box is None else tuple(np.asarray(box, np.float32) - np.tile(shift, 2)),
            tile_size=side,  # the window is one tile of the lazy grid
        )
        return Cell(prop.y0 + t.y0, prop.x0 + t.x0, prop.mask, prop.score)


@dataclass(frozen=True)
class LabelEdit:
    """Pixels to change: ``labels[indices] = values``; ``label`` is the cell's id, ``rect`` its extent."""

    indices: tuple[np.ndarray, np.ndarray]
    values: np.ndarray
    label: int
    rect: Rect


def cell_edit(
    labels: np.ndarray,
    cell: Cell,
    *,
    label: int | None = None,
    overwrite: bool = False,
    previous: Rect | None = None,
) -> LabelEdit:
    """The change that puts ``cell`` into ``labels`` (2-D) without copying the whole image.

    Args:
        label: None = a new cell (max + 1); else the cell to redraw (its old pixels, which lie in
            ``previous`` when given, else anywhere, become background first).
        overwrite: the cell may take other cells' pixels (else only background and its own).
    Raises:
        ValueError: not a 2-D label image, an empty mask, or a cell that would only cover other cells.
    """
    from cellsam.server.edits import next_label, place_mask

    if labels.ndim != 2:
        raise ValueError(f"prompts write into a 2-D Labels layer; this one has shape {labels.shape}")
    h, w = labels.shape
    lab = next_label(np.asarray(labels)) if label is None else int(label)
    mh, mw = cell.mask.shape
    y0, x0, y1, x1 = cell.y0, cell.x0, cell.y0 + mh, cell.x0 + mw
    if label is not None:
        if previous is None:
            rows, cols = np.nonzero(np.asarray(labels) == lab)
            if rows.size:
                previous = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        if previous is not None:
            y0, x0, y1, x1 = min(y0, previous[0]), min(x0, previous[1]), max(y1, previous[2]), max(x1, previous[3])
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if y0 >= y1 or x0 >= x1:
        raise ValueError("the cell lies outside the image")
    win = np.asarray(labels[y0:y1, x0:x1])
    new, _ = place_mask(win, cell.mask, y0=cell.y0 - y0, x0=cell.x0 - x0, label=lab, overwrite=overwrite)
    changed = new != win
    rows, cols = np.nonzero(changed)
    own_r, own_c = np.nonzero(new == lab)
    rect = (y0 + int(own_r.min()), x0 + int(own_c.min()), y0 + int(own_r.max()) + 1, x0 + int(own_c.max()) + 1)
    return LabelEdit((rows + y0, cols + x0), new[changed].astype(labels.dtype), lab, rect)


def apply_edit(labels: np.ndarray, edit: LabelEdit) -> None:
    """``labels[edit.indices] = edit.values`` (what napari's ``data_setitem`` does, without history)."""
    labels[edit.indices] = edit.values
