"""The sigmoid focal loss (Lin et al. 2017), shared by the detection and the mask losses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["sigmoid_focal_loss"]


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss of logits vs {0,1} targets, same shape, not reduced; ``alpha < 0``: unweighted."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss
