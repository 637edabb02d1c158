"""Mask losses for SAM-style mask decoders (stage 2 neck training, interactive fine-tuning).

* ``loss_mask_focal``: sigmoid focal loss of the mask logits vs the binary target, averaged
  over pixels and masks;
* ``loss_mask_dice``: 1 - soft Dice of sigmoid(logits) vs the target, averaged over masks;
* ``loss_iou``: MSE between the IoU head's prediction and the actual IoU of the binarised
  prediction (logit > 0) with the target (no gradient through the actual IoU).

SAM trained with focal : dice = 20 : 1 and an IoU MSE weight of 1; the weights are left to the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cellsam.train.focal import sigmoid_focal_loss

__all__ = ["dice_loss", "mask_iou", "mask_losses", "mask_weight_dict"]


def mask_iou(pred_logits: Tensor, targets: Tensor) -> Tensor:
    """IoU of (logit > 0) with (target > 0.5), per mask: (N, 1, H, W) x2 -> (N, 1); empty vs empty = 1."""
    pred = (pred_logits > 0).flatten(1)
    tgt = (targets > 0.5).flatten(1)
    inter = (pred & tgt).sum(1).float()
    union = (pred | tgt).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).unsqueeze(1)


def dice_loss(pred_logits: Tensor, targets: Tensor, *, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice per mask: (N, ...) logits and targets -> (N,)."""
    p = pred_logits.sigmoid().flatten(1)
    t = targets.flatten(1)
    return 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def mask_weight_dict(*, focal: float, dice: float, iou: float) -> dict[str, float]:
    """Weights of :func:`mask_losses`' terms, for :func:`cellsam.train.criterion.total_loss`."""
    return {"loss_mask_focal": focal, "loss_mask_dice": dice, "loss_iou": iou}


def mask_losses(pred_logits: Tensor, targets: Tensor, pred_iou: Tensor, *, alpha: float = 0.25,
                gamma: float = 2.0) -> dict[str, Tensor]:
    """Focal, Dice and IoU-regression losses of N predicted masks.

    Args:
        pred_logits: (N, 1, H, W) mask logits.
        targets: (N, 1, H, W) float binary targets (same size as the logits).
        pred_iou: (N, 1) IoU predictions (no sigmoid, as SAM's IoU head).

    Returns:
        ``loss_mask_focal``, ``loss_mask_dice``, ``loss_iou``: scalars. With N = 0 all are zero and
        still connected to ``pred_logits`` and ``pred_iou`` in the autograd graph.
    """
    if pred_logits.ndim != 4 or pred_logits.shape[1] != 1:
        raise ValueError(f"pred_logits must be (N, 1, H, W), got {tuple(pred_logits.shape)}")
    if targets.shape != pred_logits.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match pred_logits {tuple(pred_logits.shape)}")
    if pred_iou.shape != (pred_logits.shape[0], 1):
        raise ValueError(f"pred_iou must be ({pred_logits.shape[0]}, 1), got {tuple(pred_iou.shape)}")
    if pred_logits.shape[0] == 0:
        zero = pred_logits.sum() * 0.0 + pred_iou.sum() * 0.0
        return {"loss_mask_focal": zero, "loss_mask_dice": zero.clone(), "loss_iou": zero.clone()}
    logits = pred_logits.float()
    targets = targets.to(logits.dtype)
    focal = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    with torch.no_grad():
        actual_iou = mask_iou(logits, targets)
    return {
        "loss_mask_focal": focal.flatten(1).mean(1).mean(),
        "loss_mask_dice": dice_loss(logits, targets).mean(),
        "loss_iou": F.mse_loss(pred_iou.float(), actual_iou),
    }
