"""Request and response models of the labeling API (pydantic; they also make the OpenAPI schema).

Coordinates are pixels of the image: x = column, y = row; boxes are [x0, y0, x1, y1]. Label
patches travel as base64 of little-endian uint32 arrays, row-major, on a window [y0, x0, y1, x1).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from cellsam.config import DEFAULT_DIAMETER, check_diameter
from cellsam.inference.params import DEFAULT_MIN_AREA_REL

XY = tuple[float, float]
Box = tuple[float, float, float, float]


class ErrorResponse(BaseModel):
    error: str = Field(description="what went wrong, in words")


class ImageInfo(BaseModel):
    id: int
    name: str
    height: int
    width: int
    n_channels: int
    nuclear: int | None = Field(description="channel index of the nuclear stain (None: not used / automatic)")
    wholecell: int | None = Field(description="channel index of the whole-cell stain (None: not used / automatic)")
    reviewed: bool = Field(description="a person marked the labels reviewed")
    edited: bool = Field(default=False, description="a person edited the labels (not only the model or an import)")
    n_cells: int
    version: int = Field(description="labels version; +1 per edit, undo or redo")
    can_undo: bool = False
    can_redo: bool = False


class ProjectInfo(BaseModel):
    root: str
    name: str
    model: str
    tile_size: int
    images: list[ImageInfo]


class ImageUpdate(BaseModel):
    """Fields to change; leave one out to keep it. ``nuclear``/``wholecell`` may be set to null."""

    nuclear: int | None = None
    wholecell: int | None = None
    reviewed: bool | None = None


class PromptRequest(BaseModel):
    """Points (1 = inside the cell, 0 = outside) and / or a box. ``cell``: an existing cell to redraw."""

    points: list[XY] = Field(default_factory=list)
    point_labels: list[int] = Field(default_factory=list)
    box: Box | None = None
    cell: int | None = None
    overwrite: bool = Field(default=False, description="the cell may take pixels of other cells")


class CellsRequest(BaseModel):
    cells: list[int] = Field(min_length=1)


class PaintRequest(BaseModel):
    """A brush stroke: (x, y) points, brush radius in pixels; ``cell`` None paints a new cell (or,
    with ``erase``, erases every cell)."""

    points: list[XY] = Field(min_length=1, max_length=20000)
    radius: float = Field(default=4.0, ge=0.5, le=512)
    cell: int | None = None
    erase: bool = False
    overwrite: bool = False


class DetectRequest(BaseModel):
    box_threshold: float | None = Field(default=None, ge=0.0, lt=1.0)


class DetectResponse(BaseModel):
    boxes: list[Box]
    scores: list[float]


class DecodeRequest(BaseModel):
    """Accepted boxes to turn into cells. ``replace``: start from empty labels, else add to them."""

    boxes: list[Box] = Field(min_length=1, max_length=20000)
    replace: bool = True


class SegmentRequest(BaseModel):
    box_threshold: float | None = Field(default=None, ge=0.0, lt=1.0)  # None: the model's own default
    iou_threshold: float | None = None
    min_area: int = Field(default=15, ge=0)
    # cells under this fraction of the median area of the image's cells are dropped (0: off)
    min_area_rel: float = Field(default=DEFAULT_MIN_AREA_REL, ge=0.0, lt=1.0)
    # the typical cell diameter in pixels, "auto" (the model's size model) or None (the image's own scale)
    diameter: float | Literal["auto"] | None = DEFAULT_DIAMETER
    # "auto": invert the whole-cell channel of a light-background image when the model prefers it
    polarity: Literal["auto", "as_is", "inverted"] = "auto"

    @field_validator("diameter")
    @classmethod
    def _diameter(cls, v: float | str | None) -> float | str | None:
        return check_diameter(v)


class EditResponse(BaseModel):
    """The result of an edit, already committed to the project database (``saved`` is always true)."""

    image_id: int
    action: str
    version: int
    base_version: int = Field(description="labels version the edit was applied to; if it differs from "
                              "the page's, reload the labels")
    window: tuple[int, int, int, int] | None = Field(description="[y0, x0, y1, x1) of the changed pixels")
    patch: str | None = Field(description="base64 uint32 little-endian labels on the window")
    n_cells: int
    cell: int | None
    can_undo: bool
    can_redo: bool
    edited: bool = Field(default=False, description="a person has edited this image's labels (fine-tuning uses it)")
    saved: bool = True


class FinetuneRequest(BaseModel):
    mask_steps: int = Field(default=200, ge=1, le=100000)
    detection_steps: int = Field(default=0, ge=0, le=100000, description="0 skips stage 1 (boxes)")
    batch_size: int = Field(default=2, ge=1, le=64)


class JobInfo(BaseModel):
    id: str
    state: str
    phase: str
    progress: float
    message: str
    images: int = Field(description="corrected images trained on")
    tiles: int
    held_out: list[str] = Field(default_factory=list, description="corrected images kept out of training, scored")
    scored_on: str = Field(default="", description="which images the before / after scores are measured on")
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    model: str | None
    worse: bool | None = Field(default=None, description="the new model scored lower F1 than the current one")
    warning: str | None = Field(default=None, description="what to know before using the new model")


class UseRequest(BaseModel):
    force: bool = Field(default=False, description="use the new model even though it scored worse")


class UseResponse(BaseModel):
    model: str
    warning: str | None = None


class ExportInfo(BaseModel):
    folder: str = Field(description="project-relative folder written")
    files: list[str]


def encode_patch(arr: np.ndarray | None) -> str | None:
    """(h, w) int labels -> base64 of little-endian uint32."""
    if arr is None:
        return None
    return base64.b64encode(np.ascontiguousarray(arr, dtype="<u4").tobytes()).decode("ascii")


def decode_patch(s: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`encode_patch` (for tests and clients)."""
    return np.frombuffer(base64.b64decode(s), dtype="<u4").reshape(shape).astype(np.int32)
