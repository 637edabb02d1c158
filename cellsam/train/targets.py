"""Detection and mask targets derived from an instance-label image."""

from __future__ import annotations

import torch
from torch import Tensor

from cellsam.ops.boxes import box_xyxy_to_cxcywh, masks_to_boxes


def labels_to_targets(labels: Tensor, *, min_area: int = 4) -> dict[str, Tensor]:
    """Boxes and ids of the objects of one label image.

    Arguments:
        labels: (H,W) int64, 0 = background; ids need not be consecutive.
        min_area: objects with fewer pixels (e.g. slivers left by a crop) are ignored.
    Returns:
        ``ids`` (M,) int64 label ids; ``boxes_xyxy`` (M,4) float pixels (x1,y1 inclusive,
        x2,y2 exclusive); ``boxes`` (M,4) cxcywh normalised to [0,1]; ``labels`` (M,) zeros
        (the single "cell" class).
    """
    h, w = labels.shape
    ids, counts = torch.unique(labels[labels > 0], return_counts=True)
    keep = counts >= min_area
    xyxy = masks_to_boxes(labels)[keep]  # rows follow the sorted ids
    ids = ids[keep]
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return {
        "ids": ids,
        "boxes_xyxy": xyxy,
        "boxes": box_xyxy_to_cxcywh(xyxy / scale),
        "labels": torch.zeros(ids.numel(), dtype=torch.long),
    }
