"""Box conversions and overlaps (pure torch).

Formats:
    * ``cxcywh``: (centre x, centre y, width, height), usually normalised to [0, 1] (detector space).
    * ``xyxy``: (x0, y0, x1, y1) with x0 <= x1, y0 <= y1, in pixels or normalised.

Pixel convention of :func:`masks_to_boxes`: pixel (row i, column j) covers the square
[j, j+1) x [i, i+1), so the box of an object is ``(min_col, min_row, max_col + 1, max_row + 1)``.
A one-pixel object therefore has width and height 1 and area 1, and ``box * scale`` maps boxes
between resolutions exactly (edges, not pixel centres, are scaled).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "paired_generalized_box_iou",
    "box_xyxy_to_cxcywh",
    "clip_boxes",
    "generalized_box_iou",
    "masks_to_boxes",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def scale_boxes(boxes: Tensor, factors: Tensor) -> Tensor:
    """(N, 4) xyxy boxes with width and height multiplied by ``factors`` (N, 2); centres are kept."""
    c = box_xyxy_to_cxcywh(boxes)
    return box_cxcywh_to_xyxy(torch.cat((c[:, :2], c[:, 2:] * factors), dim=1))


def box_area(boxes: Tensor) -> Tensor:
    """Area of (..., 4) xyxy boxes -> (...)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_and_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (N, M)
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def _check_pair(boxes1: Tensor, boxes2: Tensor) -> None:
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if b.ndim != 2 or b.shape[-1] != 4:
            raise ValueError(f"{name} must have shape (N, 4), got {tuple(b.shape)}")


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4), (M, 4) -> (N, M)."""
    _check_pair(boxes1, boxes2)
    return _iou_and_union(boxes1, boxes2)[0]


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes: (N, 4), (M, 4) -> (N, M).

    Values lie in [-1, 1]. Boxes must be non-degenerate (x1 > x0, y1 > y0) for a finite result
    when both boxes of a pair have zero area.
    """
    _check_pair(boxes1, boxes2)
    iou, union = _iou_and_union(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(dim=-1)
    return iou - (hull - union) / hull


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of row i of ``boxes1`` with row i of ``boxes2`` (xyxy): (N, 4), (N, 4) -> (N,).

    The diagonal of :func:`generalized_box_iou` (the same arithmetic per pair) in O(N), for losses
    over matched pairs.
    """
    _check_pair(boxes1, boxes2)
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"paired boxes need equal shapes, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    inter = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    hull = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0).prod(-1)
    return inter / union - (hull - union) / hull


def clip_boxes(boxes: Tensor, *, size: int | tuple[int, int]) -> Tensor:
    """Clip (..., 4) xyxy boxes to an image of ``size`` (side or (H, W)): x to [0, W], y to [0, H]."""
    h, w = (size, size) if isinstance(size, int) else size
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size}")
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0.clamp(0, w), y0.clamp(0, h), x1.clamp(0, w), y1.clamp(0, h)), dim=-1)


def masks_to_boxes(masks: Tensor | np.ndarray) -> Tensor:
    """Tight xyxy pixel boxes of objects (see the module docstring for the +1 convention).

    Args:
        masks: either a label image (H, W) of integers, 0 = background, or a stack of binary
            masks (N, H, W) (bool, or numbers where nonzero = inside).

    Returns:
        (N, 4) float32 xyxy boxes in pixels. For a label image, row i belongs to the i-th smallest
        nonzero label (``torch.unique(labels[labels > 0])``); for a mask stack, row i to mask i, and an
        empty mask gives an all-zero box.
    """
    t = torch.as_tensor(masks)
    if t.ndim == 2:
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"a 2-D input must be an integer label image, got dtype {t.dtype}")
        return _label_image_to_boxes(t)
    if t.ndim == 3:
        return _mask_stack_to_boxes(t != 0)
    raise ValueError(f"expected a label image (H, W) or masks (N, H, W), got shape {tuple(t.shape)}")


def _label_image_to_boxes(labels: Tensor) -> Tensor:
    ys, xs = torch.nonzero(labels > 0, as_tuple=True)
    values = labels[ys, xs]
    ids, inverse = torch.unique(values, return_inverse=True)
    n = ids.numel()
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=labels.device)
    if n == 0:
        return boxes
    big = torch.iinfo(torch.int64).max
    x0 = torch.full((n,), big, dtype=torch.int64, device=labels.device).scatter_reduce(0, inverse, xs, "amin")
    y0 = torch.full((n,), big, dtype=torch.int64, device=labels.device).scatter_reduce(0, inverse, ys, "amin")
    x1 = torch.full((n,), -1, dtype=torch.int64, device=labels.device).scatter_reduce(0, inverse, xs, "amax")
    y1 = torch.full((n,), -1, dtype=torch.int64, device=labels.device).scatter_reduce(0, inverse, ys, "amax")
    return torch.stack((x0, y0, x1 + 1, y1 + 1), dim=-1).to(torch.float32)


def _mask_stack_to_boxes(masks: Tensor) -> Tensor:
    n, h, w = masks.shape
    boxes = torch.zeros((n, 4), dtype=torch.float32, device=masks.device)
    if n == 0:
        return boxes
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    nonempty = rows.any(dim=1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    stacked = torch.stack((x0, y0, x1, y1), dim=-1).to(torch.float32)
    boxes[nonempty] = stacked[nonempty]
    return boxes
