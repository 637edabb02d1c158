"""Detection and mask targets derived from an instance-label image."""

from __future__ import annotations

import torch
from torch import Tensor


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
    flat = labels.flatten()
    ids, counts = torch.unique(flat, return_counts=True)
    keep = (ids > 0) & (counts >= min_area)
    ids = ids[keep]
    if ids.numel() == 0:
        z = torch.zeros((0, 4))
        return {"ids": ids, "boxes_xyxy": z, "boxes": z.clone(), "labels": torch.zeros(0, dtype=torch.long)}
    # rows / cols where each object appears: min and max via scatter_reduce
    index = torch.searchsorted(ids, flat.clamp_min(0))
    index = index.clamp_max(ids.numel() - 1)
    valid = ids[index] == flat
    idx = index[valid]
    pos = torch.nonzero(valid).squeeze(1)
    ys, xs = (pos // w).float(), (pos % w).float()
    m = ids.numel()
    inf = torch.full((m,), float("inf"))
    x1 = inf.clone().scatter_reduce(0, idx, xs, "amin")
    y1 = inf.clone().scatter_reduce(0, idx, ys, "amin")
    x2 = (-inf).scatter_reduce(0, idx, xs, "amax") + 1
    y2 = (-inf).scatter_reduce(0, idx, ys, "amax") + 1
    xyxy = torch.stack([x1, y1, x2, y2], 1)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    n = xyxy / scale
    cxcywh = torch.stack([(n[:, 0] + n[:, 2]) / 2, (n[:, 1] + n[:, 3]) / 2, n[:, 2] - n[:, 0], n[:, 3] - n[:, 1]], 1)
    return {"ids": ids, "boxes_xyxy": xyxy, "boxes": cxcywh, "labels": torch.zeros(m, dtype=torch.long)}
