"""Detection losses for CellFinder (Anchor DETR's ``SetCriterion``).

For the final decoder output and each auxiliary one (keys suffixed ``_0``, ``_1``, ...), after
Hungarian matching:

* ``loss_ce``: sigmoid focal loss on one-hot targets (no background column; unmatched queries
  have all-zero targets), summed over queries x classes and divided by ``num_boxes``;
* ``loss_bbox``: L1 between matched normalised cxcywh boxes, summed / ``num_boxes``;
* ``loss_giou``: (1 - GIoU) of matched boxes, summed / ``num_boxes``.

With ``anchor_losses=True`` the one-to-many box losses of :mod:`cellsam.train.anchor_loss`
(``loss_anchor_bbox``, ``loss_anchor_giou``, same suffixes) are added for every output.

``num_boxes`` is the number of target boxes in the batch, averaged over DDP ranks when
torch.distributed is initialised, clamped to >= 1. Combine with :func:`total_loss` and a weight
dict such as :func:`detection_weight_dict` (2 / 5 / 2 as in Anchor DETR).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cellsam.ops.boxes import box_cxcywh_to_xyxy, paired_generalized_box_iou
from cellsam.train.anchor_loss import anchor_assignment, anchor_box_losses
from cellsam.train.focal import sigmoid_focal_loss
from cellsam.train.matcher import HungarianMatcher

__all__ = ["SetCriterion", "anchor_weight_dict", "detection_weight_dict", "sigmoid_focal_loss", "total_loss"]


def detection_weight_dict(*, num_decoder_layers: int, ce: float = 2.0, bbox: float = 5.0,
                          giou: float = 2.0) -> dict[str, float]:
    """Loss weights for the final output and the ``num_decoder_layers - 1`` auxiliary outputs."""
    return _per_layer({"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}, num_decoder_layers)


def anchor_weight_dict(*, num_decoder_layers: int, bbox: float, giou: float) -> dict[str, float]:
    """Weights of the one-to-many anchor box losses for the final and the auxiliary outputs."""
    return _per_layer({"loss_anchor_bbox": bbox, "loss_anchor_giou": giou}, num_decoder_layers)


def _per_layer(base: dict[str, float], num_decoder_layers: int) -> dict[str, float]:
    """``base`` for the final output plus its keys suffixed ``_i`` for each auxiliary output i."""
    weights = dict(base)
    for i in range(num_decoder_layers - 1):
        weights.update({f"{k}_{i}": v for k, v in base.items()})
    return weights


def total_loss(losses: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """Weighted sum of the losses named in ``weight_dict`` (other entries are ignored)."""
    terms = [losses[k] * w for k, w in weight_dict.items() if k in losses]
    if not terms:
        raise ValueError(f"no loss in {sorted(losses)} has a weight in {sorted(weight_dict)}")
    return torch.stack(terms).sum()


def _num_boxes(targets: list[dict[str, Tensor]], device: torch.device) -> float:
    n = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(float(n.item()), 1.0)


class SetCriterion(nn.Module):
    """Focal + L1 + GIoU set loss for Anchor-DETR outputs.

    Args:
        num_classes: K, the number of sigmoid classes of ``pred_logits``.
        matcher: the Hungarian matcher (called once per decoder output).
        weight_dict: loss weights, kept for :meth:`total` (the losses returned are unweighted).
        focal_alpha, focal_gamma: focal-loss parameters of ``loss_ce``.
        anchor_losses: also return the one-to-many anchor box losses (needs ``anchors`` in the outputs).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, anchor_losses: bool = False) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.anchor_losses = anchor_losses

    def _check_targets(self, outputs: dict, targets: list[dict[str, Tensor]]) -> None:
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}")
        if outputs["pred_logits"].shape[-1] != self.num_classes:
            k = outputs["pred_logits"].shape[-1]
            raise ValueError(f"pred_logits has {k} classes, expected {self.num_classes}")
        for i, t in enumerate(targets):
            labels = t["labels"]
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"target {i}: labels must be in [0, {self.num_classes}), got {labels.tolist()}"
                )

    def _single(self, outputs: dict, targets: list[dict[str, Tensor]], num_boxes: float) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        device = logits.device
        pairs = list(zip(targets, indices, strict=True))
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)

        onehot = torch.zeros_like(logits)
        if src_idx.numel():
            labels = torch.cat([t["labels"].to(device)[j.to(device)] for t, (_, j) in pairs])
            onehot[batch_idx, src_idx, labels.long()] = 1.0
        focal = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma)
        loss_ce = focal.sum() / num_boxes

        src_boxes = boxes[batch_idx, src_idx]
        tgt_boxes = torch.cat([t["boxes"].to(device)[j.to(device)] for t, (_, j) in pairs])
        tgt_boxes = tgt_boxes.to(src_boxes.dtype).reshape(-1, 4)
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="none").sum() / num_boxes
        if src_boxes.shape[0]:
            giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(tgt_boxes))
            loss_giou = (1 - giou).sum() / num_boxes
        else:  # no targets at all: zero, but still connected to the graph
            loss_giou = boxes.sum() * 0.0
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Unweighted losses.

        Args:
            outputs: CellFinder outputs: ``pred_logits`` (B, Q, K), ``pred_boxes`` (B, Q, 4) cxcywh,
                optional ``aux_outputs`` (list of dicts with the same keys), ``anchors`` (Q, 2) when
            ``anchor_losses``.
            targets: B dicts with ``labels`` (M,) int64 in [0, K) and ``boxes`` (M, 4) cxcywh in [0, 1].

        Returns:
            ``loss_ce``, ``loss_bbox``, ``loss_giou`` and for aux output i the same keys suffixed ``_i``.
        """
        self._check_targets(outputs, targets)
        num_boxes = _num_boxes(targets, outputs["pred_logits"].device)
        if self.anchor_losses and "anchors" not in outputs:
            raise ValueError("anchor_losses needs the queries' 'anchors' in the outputs (CellFinder gives them)")
        losses = self._single(outputs, targets, num_boxes)
        if self.anchor_losses:  # which query regresses which box: the same for every decoder layer
            anchors = outputs["anchors"]
            assigned = [anchor_assignment(anchors, t["boxes"].to(anchors)) for t in targets]
            losses.update(anchor_box_losses(outputs["pred_boxes"], anchors, targets, assigned))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._single(aux, targets, num_boxes).items()})
            if self.anchor_losses:
                extra = anchor_box_losses(aux["pred_boxes"], anchors, targets, assigned)
                losses.update({f"{k}_{i}": v for k, v in extra.items()})
        return losses

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """``total_loss(losses, self.weight_dict)``."""
        return total_loss(losses, self.weight_dict)
