"""The parameters of a segmentation, as one frozen object that validates itself.

:class:`SegmentParams` is what :func:`cellsam.segment`, :func:`cellsam.distributed.segment_dask`, the command
line and file segmentation (:mod:`cellsam.inference.files`) pass down to the pipeline. ``None`` thresholds and
tile size mean "the model's own": :meth:`SegmentParams.for_model` (or :meth:`SegmentParams.filled`, from the
values alone) fills them in one place, from the model's ``cfg.inference`` and ``cfg.tile_size``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from cellsam.config import (
    AUTO,
    DEFAULT_DECODE_WINDOW,
    DEFAULT_DIAMETER,
    FlipTest,
    InferenceConfig,
    check_decode_window,
    check_diameter,
    check_polarity,
    flip_test_mode,
)

__all__ = ["DEFAULT_MIN_AREA", "DEFAULT_MIN_AREA_REL", "PRECISIONS", "ModelValues", "SegmentParams",
           "params_or_keywords"]

DEFAULT_MIN_AREA = 15
# cells under this fraction of the median area of the image's cells are dropped as specks and fragments:
# on the val split, v6's false positives that touch no annotated cell had a median area of 38 px against
# 363 px for its true cells (DSB); see benchmarks/min_area_rel.md
DEFAULT_MIN_AREA_REL = 0.15
PRECISIONS = ("fp32", "bf16")


class ModelValues(NamedTuple):
    """The values a filled :class:`SegmentParams` took from the model (or from the user)."""

    tile_size: int
    box_threshold: float
    iou_threshold: float
    mask_threshold: float
    box_threshold_rel: float


@dataclass(frozen=True)
class SegmentParams:
    """How to segment (see :func:`cellsam.segment` for each parameter's meaning).

    ``box_threshold``, ``box_threshold_rel``, ``iou_threshold``, ``mask_threshold``, ``flip_test`` and
    ``tile_size`` left None are the model's own
    (:meth:`for_model`); ``diameter`` (None, ``"auto"`` or pixels > 0) sets the scale through the tile size
    (:mod:`cellsam.inference.scale`), so a user gives one of ``diameter`` and ``tile_size`` (with a
    ``tile_size``, the default ``"auto"`` becomes None; a number is an error). ``filled``: the
    None values have been filled from a model (then ``tile_size`` is the model's native tile beside a
    ``diameter``). Invalid values raise ``ValueError`` when the object is made.
    """

    box_threshold: float | None = None
    box_threshold_rel: float | None = None
    iou_threshold: float | None = None
    mask_threshold: float | None = None
    min_area: int = DEFAULT_MIN_AREA
    min_area_rel: float = DEFAULT_MIN_AREA_REL
    tile_size: int | None = None
    tile_overlap: float = 0.25
    diameter: float | str | None = DEFAULT_DIAMETER
    polarity: str = AUTO
    batch_size: int = 4
    decode_chunk: int | None = None
    decode_copies: bool = False
    decode_window: float | None = DEFAULT_DECODE_WINDOW
    flip_test: FlipTest | bool | None = None
    precision: str = "fp32"
    return_masks: bool = False
    progress: bool = False
    filled: bool = False

    def __post_init__(self) -> None:
        from cellsam.inference.tiling import tile_grid
        from cellsam.ops.masks import logit_threshold

        for name in ("box_threshold", "iou_threshold"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
        rel = self.box_threshold_rel
        if rel is not None and not (math.isfinite(rel) and 0.0 <= rel < 1.0):
            raise ValueError(f"box_threshold_rel must be in [0, 1) (0: off), got {rel}")
        if not (math.isfinite(self.min_area_rel) and 0.0 <= self.min_area_rel < 1.0):
            raise ValueError(f"min_area_rel must be in [0, 1) (0: off), got {self.min_area_rel}")
        if self.mask_threshold is not None:
            logit_threshold(self.mask_threshold)  # (0, 1), with the library's message
        check_polarity(self.polarity)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.batch_size < 1 or (self.decode_chunk is not None and self.decode_chunk < 1):
            raise ValueError(f"batch_size and decode_chunk must be >= 1, got {self.batch_size}, {self.decode_chunk}")
        tile_grid((1, 1), tile_size=16 if self.tile_size is None else self.tile_size, overlap=self.tile_overlap)
        diameter = check_diameter(self.diameter)
        if diameter is not None and self.tile_size is not None and not self.filled:
            if diameter != AUTO:
                raise ValueError("give diameter or tile_size, not both (both set the scale)")
            diameter = None  # a given tile size sets the scale: "auto" (the default) steps aside
        normal = {
            "min_area": int(self.min_area),
            "min_area_rel": float(self.min_area_rel),
            "tile_size": None if self.tile_size is None else int(self.tile_size),
            "tile_overlap": float(self.tile_overlap),
            "diameter": diameter,
            "batch_size": int(self.batch_size),
            "decode_chunk": None if self.decode_chunk is None else int(self.decode_chunk),
            "decode_copies": bool(self.decode_copies),
            "decode_window": check_decode_window(self.decode_window),
            "flip_test": None if self.flip_test is None else flip_test_mode(self.flip_test),
        }
        for name, value in normal.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> SegmentParams:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def filled_from(self, tile_size: int, inference: InferenceConfig) -> SegmentParams:
        """The None thresholds and tile size filled from a model's ``cfg.tile_size`` and ``cfg.inference``.

        Raises ``ValueError`` for a diameter in pixels when the model has no ``cell_diameter`` (no size
        reference; ``"auto"`` then keeps the image's own scale), and for a ``tile_size`` above
        ``MAX_SCALE`` times the model's (the scale ``diameter`` is clamped to as well).
        """
        from cellsam.inference.scale import MAX_SCALE

        if self.tile_size is not None and self.tile_size > MAX_SCALE * tile_size:
            raise ValueError(f"tile_size {self.tile_size} would shrink the image more than {MAX_SCALE:g}x below the "
                             f"model's scale (its tile is {tile_size} px): at most {int(MAX_SCALE * tile_size)}, or "
                             "give the cells' diameter instead")
        if self.diameter not in (None, AUTO) and not inference.cell_diameter:
            raise ValueError("this model has no cell diameter (cfg.inference.cell_diameter): segment it with "
                             "tile_size instead of diameter")
        return self.replace(
            box_threshold=inference.box_threshold if self.box_threshold is None else self.box_threshold,
            box_threshold_rel=(inference.box_threshold_rel if self.box_threshold_rel is None
                               else self.box_threshold_rel),
            iou_threshold=inference.iou_threshold if self.iou_threshold is None else self.iou_threshold,
            mask_threshold=inference.mask_threshold if self.mask_threshold is None else self.mask_threshold,
            flip_test=inference.flip_test if self.flip_test is None else self.flip_test,
            tile_size=int(tile_size) if self.tile_size is None else self.tile_size,
            filled=True,
        )

    def for_model(self, model: object) -> SegmentParams:
        """:meth:`filled_from` the model's own tile size and inference defaults."""
        from cellsam.models.protocol import inference_defaults, model_tile_size

        return self.filled_from(model_tile_size(model), inference_defaults(model))

    def model_values(self) -> ModelValues:
        """Tile size and thresholds of a filled object (``ValueError`` if one is still None)."""
        t, b, i, m = self.tile_size, self.box_threshold, self.iou_threshold, self.mask_threshold
        r = self.box_threshold_rel
        if t is None or b is None or i is None or m is None or r is None:
            raise ValueError("segmentation parameters without a tile size or thresholds: fill them from the "
                             "model first (SegmentParams.for_model)")
        return ModelValues(t, b, i, m, r)


def params_or_keywords(params: SegmentParams | None, **keywords: Any) -> SegmentParams:
    """``params`` when given (then the keyword arguments must be left at their defaults), else
    ``SegmentParams(**keywords)``: what :func:`cellsam.segment` and ``segment_dask`` accept as either."""
    given = SegmentParams(**keywords)
    if params is None:
        return given
    if given != SegmentParams():
        raise ValueError("give the segmentation parameters either as params= or as keyword arguments, not both")
    return params
