"""One-to-many box regression for anchor-point queries: a convergence aid for CellFinder.

The Hungarian set loss (:mod:`cellsam.train.criterion`) gives each ground-truth cell ONE query, so a
batch of 4 crops trains the box head on ~100 boxes per step, and on a CPU budget the head never
learns box *size* (measured on the first shipped model: on 40 val crops, even the best of the 576
queries reached IoU >= 0.5 for only 29% of DSB nuclei, and predicted widths spread 5 px against
8 px for the cells). Here every query whose anchor point lies inside a cell's box also regresses
that box (L1 + GIoU), the idea of the one-to-many branches of H-DETR (Jia et al. 2023) and Co-DETR
(Zong et al. 2023) reduced to its cheapest form: no second query group, no matching, box losses
only. Classification stays one-to-one (Hungarian), so inference still needs no NMS.

Assignment (:func:`anchor_assignment`): a query goes to the smallest box containing its anchor; a
box that contains no anchor (a cell smaller than the anchor spacing) takes its nearest anchor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cellsam.ops.boxes import box_cxcywh_to_xyxy, paired_generalized_box_iou

__all__ = ["anchor_assignment", "anchor_box_losses"]


def anchor_assignment(anchors: Tensor, boxes: Tensor) -> Tensor:
    """Which box each anchor regresses.

    Args:
        anchors: (Q, 2) anchor points (x, y) in [0, 1].
        boxes: (M, 4) target boxes, cxcywh in [0, 1].

    Returns:
        (Q,) int64 index into ``boxes``, -1 for anchors outside every box.
    """
    if anchors.ndim != 2 or anchors.shape[1] != 2:
        raise ValueError(f"anchors must be (Q, 2), got {tuple(anchors.shape)}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (M, 4), got {tuple(boxes.shape)}")
    q, m = anchors.shape[0], boxes.shape[0]
    assigned = torch.full((q,), -1, dtype=torch.long, device=anchors.device)
    if m == 0 or q == 0:
        return assigned
    a = anchors.detach().to(boxes.dtype)
    xyxy = box_cxcywh_to_xyxy(boxes)
    inside = ((a[:, None, 0] >= xyxy[None, :, 0]) & (a[:, None, 0] <= xyxy[None, :, 2])
              & (a[:, None, 1] >= xyxy[None, :, 1]) & (a[:, None, 1] <= xyxy[None, :, 3]))  # (Q, M)
    area = (boxes[:, 2] * boxes[:, 3])[None].expand(q, m)
    cost = torch.where(inside, area, torch.full_like(area, float("inf")))
    best_cost, best = cost.min(dim=1)
    assigned = torch.where(torch.isfinite(best_cost), best, assigned)
    empty = torch.nonzero(~inside.any(dim=0)).squeeze(1)
    if empty.numel():
        nearest = torch.cdist(a, boxes[empty, :2]).argmin(dim=0)  # (E,)
        assigned[nearest] = empty
    return assigned


def anchor_box_losses(pred_boxes: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]],
                      assigned: list[Tensor] | None = None) -> dict[str, Tensor]:
    """L1 and (1 - GIoU) of every assigned query's box vs its cell's box, mean over assigned queries.

    Args:
        pred_boxes: (B, Q, 4) predicted cxcywh in [0, 1].
        anchors: (Q, 2) the queries' anchor points.
        targets: B dicts with ``boxes`` (M, 4) cxcywh in [0, 1].
        assigned: per image, :func:`anchor_assignment` of ``anchors`` and its boxes, when the caller
            has it already (it depends on the targets only, so one computation serves every decoder layer).

    Returns:
        ``loss_anchor_bbox`` (L1 summed over the 4 coordinates) and ``loss_anchor_giou``; zero (still
        in the graph) when no query is assigned.
    """
    if pred_boxes.ndim != 3 or pred_boxes.shape[1:] != (anchors.shape[0], 4):
        raise ValueError(f"pred_boxes {tuple(pred_boxes.shape)} do not match anchors {tuple(anchors.shape)}")
    if len(targets) != pred_boxes.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {pred_boxes.shape[0]}")
    if assigned is not None and len(assigned) != len(targets):
        raise ValueError(f"{len(assigned)} assignments for {len(targets)} targets")
    src, tgt = [], []
    for b, t in enumerate(targets):
        boxes = t["boxes"].to(pred_boxes)
        idx = anchor_assignment(anchors, boxes) if assigned is None else assigned[b]
        pos = torch.nonzero(idx >= 0).squeeze(1)
        src.append(pred_boxes[b, pos])
        tgt.append(boxes[idx[pos]])
    s, g = torch.cat(src), torch.cat(tgt)
    if s.shape[0] == 0:
        z = pred_boxes.sum() * 0.0
        return {"loss_anchor_bbox": z, "loss_anchor_giou": z}
    n = float(s.shape[0])
    l1 = F.l1_loss(s, g, reduction="none").sum() / n
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(s), box_cxcywh_to_xyxy(g))
    return {"loss_anchor_bbox": l1, "loss_anchor_giou": (1 - giou).sum() / n}
