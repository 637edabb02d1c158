"""Routes: model prompts (segment all, detect, decode boxes, click / box prompts) and label edits.

Every edit is committed to the project database before the reply (``saved: true``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from cellsam.server import edits
from cellsam.server.context import ServerContext, edit_response
from cellsam.server.images import channel_key
from cellsam.server.schemas import (
    CellsRequest,
    DecodeRequest,
    DetectRequest,
    DetectResponse,
    EditResponse,
    PaintRequest,
    PromptRequest,
    SegmentRequest,
)
from cellsam.server.session import proposals_to_labels


class EmbedRequest(BaseModel):
    """Where the page is looking (x, y); None = the image centre."""

    x: float | None = None
    y: float | None = None


class EmbedResponse(BaseModel):
    tiles: int
    encoder_calls: int
    cached_embeddings: int


def router(ctx: ServerContext) -> APIRouter:
    r = APIRouter(prefix="/api/images/{image_id}", tags=["edit"])
    project, session = ctx.project, ctx.session

    def image(image_id: int) -> tuple[Any, np.ndarray]:
        rec = ctx.record(image_id)
        return rec, ctx.prepared(rec)

    @r.post("/embed", response_model=EmbedResponse)
    def embed(image_id: int, body: EmbedRequest | None = None) -> EmbedResponse:
        """Compute (and cache) the embedding of the tile around (x, y) so the next prompt is fast."""
        rec, img = image(image_id)
        x = rec.width / 2 if body is None or body.x is None else body.x
        y = rec.height / 2 if body is None or body.y is None else body.y
        with session.lock:
            size = session.scale(channel_key(rec), img)
            tiles = session.tiles((rec.height, rec.width), size)
            before = session.embeddings.misses
            i = session.best_tile(tiles, (x, y, x, y))
            session._predictor(channel_key(rec), img, tiles, i, size)
            calls = session.embeddings.misses - before
        return EmbedResponse(tiles=len(tiles), encoder_calls=calls, cached_embeddings=len(session.embeddings))

    @r.post("/segment", response_model=EditResponse)
    def segment_all(image_id: int, body: SegmentRequest | None = None) -> EditResponse:
        """Run CellFinder + SAM on the whole image and replace its labels (one undoable edit)."""
        body = body or SegmentRequest()
        rec, img = image(image_id)
        try:
            seg = session.segment_all(img, channel_key(rec), box_threshold=body.box_threshold,
                                      iou_threshold=body.iou_threshold, min_area=body.min_area,
                                      min_area_rel=body.min_area_rel, diameter=body.diameter, polarity=body.polarity)
        except ValueError as e:  # e.g. a diameter for a model without a size reference
            raise HTTPException(422, str(e)) from None
        return edit_response(project.set_labels(image_id, seg.labels, action="segment all"))

    @r.post("/detect", response_model=DetectResponse)
    def detect(image_id: int, body: DetectRequest | None = None) -> DetectResponse:
        """CellFinder's boxes, to review before any mask is made."""
        body = body or DetectRequest()
        rec, img = image(image_id)
        boxes, scores = session.detect(channel_key(rec), img, box_threshold=body.box_threshold)
        return DetectResponse(boxes=[(float(x0), float(y0), float(x1), float(y1)) for x0, y0, x1, y1 in boxes],
                              scores=[float(s) for s in scores])

    @r.post("/decode", response_model=EditResponse)
    def decode(image_id: int, body: DecodeRequest) -> EditResponse:
        """Masks for the accepted boxes; ``replace`` starts from empty labels, else the new cells only
        take background pixels."""
        rec, img = image(image_id)
        boxes = np.asarray(body.boxes, np.float32).reshape(-1, 4)
        if not np.isfinite(boxes).all() or (boxes[:, 2] <= boxes[:, 0]).any() or (boxes[:, 3] <= boxes[:, 1]).any():
            raise ValueError("every box must be finite with x1 > x0 and y1 > y0")
        props = session.decode_boxes(channel_key(rec), img, boxes)
        new = proposals_to_labels(props, (rec.height, rec.width))

        def apply(old: np.ndarray) -> tuple[np.ndarray, None]:
            if body.replace:
                return new, None
            out = old.copy()
            free = (new > 0) & (old == 0)
            out[free] = new[free] + edits.next_label(old) - 1
            return out, None

        return edit_response(project.edit(image_id, "add boxes" if not body.replace else "decode boxes", apply,
                                          detail={"boxes": len(props)}))

    @r.post("/cells", response_model=EditResponse)
    def prompt_cell(image_id: int, body: PromptRequest) -> EditResponse:
        """Add a cell (``cell`` null) or redraw cell ``cell`` from points and / or a box."""
        rec, img = image(image_id)
        if len(body.points) != len(body.point_labels):
            raise ValueError(f"{len(body.points)} points but {len(body.point_labels)} point_labels")
        if any(v not in (0, 1) for v in body.point_labels):
            raise ValueError("point_labels must be 1 (inside the cell) or 0 (outside)")
        box = body.box
        if body.cell is not None:
            current = project.labels(image_id)[1]
            _require_cell(current, body.cell)
            box = box or _refine_box(current, body.cell, body.points, body.point_labels)
        prop = session.predict(channel_key(rec), img, points=list(body.points), point_labels=list(body.point_labels),
                               box=box)
        action = "refine cell" if body.cell is not None else ("add cell (box)" if body.box else "add cell (points)")
        return edit_response(project.edit(
            image_id, action,
            lambda old: edits.place_mask(old, prop.mask, y0=prop.y0, x0=prop.x0, label=body.cell,
                                         overwrite=body.overwrite),
            detail=body.model_dump(),
        ))

    @r.post("/delete", response_model=EditResponse)
    def delete(image_id: int, body: CellsRequest) -> EditResponse:
        return edit_response(project.edit(image_id, "delete", lambda old: (edits.delete_cells(old, body.cells), None),
                                          detail={"cells": body.cells}))

    @r.post("/merge", response_model=EditResponse)
    def merge(image_id: int, body: CellsRequest) -> EditResponse:
        """Merge the cells into the one with the smallest id."""
        return edit_response(project.edit(image_id, "merge", lambda old: edits.merge_cells(old, body.cells),
                                          detail={"cells": body.cells}))

    @r.post("/paint", response_model=EditResponse)
    def paint(image_id: int, body: PaintRequest) -> EditResponse:
        """Brush stroke: paint cell ``cell`` (null: a new cell) or erase (``erase``)."""
        if body.cell is not None and not body.erase:
            _require_cell(project.labels(image_id)[1], body.cell)
        return edit_response(project.edit(
            image_id, "erase" if body.erase else "paint",
            lambda old: edits.paint(old, body.points, body.radius, label=body.cell, erase=body.erase,
                                    overwrite=body.overwrite),
            detail={"cell": body.cell, "radius": body.radius, "points": len(body.points)},
        ))

    @r.post("/undo", response_model=EditResponse)
    def undo(image_id: int) -> EditResponse:
        return edit_response(project.undo(image_id))

    @r.post("/redo", response_model=EditResponse)
    def redo(image_id: int) -> EditResponse:
        return edit_response(project.redo(image_id))

    return r


def _refine_box(
    labels: np.ndarray, cell: int, points: list[tuple[float, float]], point_labels: list[int], margin: float = 2.0
) -> tuple[float, float, float, float]:
    """Box prompt for redrawing ``cell``: its bounding box grown to hold the positive points, plus a margin."""
    _require_cell(labels, cell)
    ys, xs = np.nonzero(labels == cell)
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
    for (x, y), lab in zip(points, point_labels, strict=True):
        if lab == 1:
            x0, y0, x1, y1 = min(x0, x), min(y0, y), max(x1, x + 1), max(y1, y + 1)
    h, w = labels.shape
    return max(x0 - margin, 0.0), max(y0 - margin, 0.0), min(x1 + margin, float(w)), min(y1 + margin, float(h))


def _require_cell(labels: np.ndarray, cell: int) -> None:
    if cell < 1 or not (labels == cell).any():
        raise ValueError(f"no cell {cell} in this image")
