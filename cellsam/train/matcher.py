"""Hungarian matching of detector queries to ground-truth boxes (Deformable / Anchor DETR costs).

Cost of assigning query q to target t:
``cost_class * focal(q, label_t) + cost_bbox * |box_q - box_t|_1 - cost_giou * GIoU(box_q, box_t)``
with the focal class cost ``a (1-p)^g (-log p) - (1-a) p^g (-log(1-p))``, p = sigmoid logit of the
target's class. Boxes are normalised cxcywh. Solved exactly with scipy's ``linear_sum_assignment``,
one image at a time, on CPU.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from cellsam.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """One-to-one matching between predictions and targets.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the focal class cost, L1 box cost and
            negative GIoU cost (defaults 2 / 5 / 2 as in Anchor DETR).
        focal_alpha, focal_gamma: focal-cost parameters.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Cost (Q, M) for one image: logits (Q, K), boxes (Q, 4), tgt_labels (M,), tgt_boxes (M, 4)."""
        p = logits.float().sigmoid()
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * p.pow(g) * -(1 - p + 1e-8).log()
        pos = a * (1 - p).pow(g) * -(p + 1e-8).log()
        c_class = (pos - neg)[:, tgt_labels]
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return self.cost_bbox * c_bbox + self.cost_class * c_class + self.cost_giou * c_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match each image.

        Args:
            outputs: ``pred_logits`` (B, Q, K) and ``pred_boxes`` (B, Q, 4) cxcywh in [0, 1].
            targets: B dicts with ``labels`` (M_b,) int64 and ``boxes`` (M_b, 4) cxcywh in [0, 1].

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors, each of length min(Q, M_b), sorted by
            ``pred_idx``.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {logits.shape[0]} predictions")
        indices = []
        for b, tgt in enumerate(targets):
            labels, tboxes = tgt["labels"], tgt["boxes"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            if tboxes.shape != (labels.shape[0], 4):
                raise ValueError(
                    f"target {b}: boxes {tuple(tboxes.shape)} do not match labels {tuple(labels.shape)}"
                )
            cost = self.cost_matrix(logits[b], boxes[b], labels.long(), tboxes).cpu()
            if not torch.isfinite(cost).all():
                raise ValueError(f"image {b}: the matching cost has non-finite values (NaN/inf predictions?)")
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64)))
        return indices
