"""Losses of the dense CellFinder (CenterNet, with a box GIoU term).

* ``loss_heatmap``: CenterNet's penalty-reduced pixel-wise focal loss (alpha 2, beta 4) of the
  heatmap logits vs the Gaussian targets, summed and divided by the number of cells;
* ``loss_size``: L1 of log(w, h / stride), weighted by the target Gaussian where a cell owns the map;
* ``loss_offset``: L1 of the sub-pixel centre offset, same weights;
* ``loss_giou``: 1 - GIoU of the box decoded at those locations vs the owner's box, same weights.

Every term is normalised by the batch's number of cells (clamped to >= 1). :class:`DenseCriterion`
has the interface of :class:`~cellsam.train.criterion.SetCriterion`: called with the detector's
outputs and targets (``boxes`` cxcywh in [0, 1]), it returns unweighted losses; :meth:`total`
weights them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellsam.ops.boxes import box_cxcywh_to_xyxy, paired_generalized_box_iou
from cellsam.train.criterion import total_loss
from cellsam.train.dense_targets import DenseTargets, dense_targets

__all__ = ["DenseCriterion", "centernet_focal_loss", "dense_weight_dict"]


def dense_weight_dict(*, heatmap: float, size: float, offset: float, giou: float) -> dict[str, float]:
    """Weights of :class:`DenseCriterion`'s terms, for its :meth:`~DenseCriterion.total`."""
    return {"loss_heatmap": heatmap, "loss_size": size, "loss_offset": offset, "loss_giou": giou}


def centernet_focal_loss(logits: Tensor, target: Tensor, *, alpha: float = 2.0, beta: float = 4.0) -> Tensor:
    """Summed penalty-reduced focal loss: positives where ``target == 1``, negatives down-weighted by
    ``(1 - target) ** beta`` near a peak. ``logits`` and ``target`` of the same shape; not normalised."""
    pos = target >= 1.0
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    pos_loss = (1 - p) ** alpha * log_p
    neg_loss = (1 - target) ** beta * p**alpha * log_not_p
    return -torch.where(pos, pos_loss, neg_loss).sum()


class DenseCriterion(nn.Module):
    """CenterNet losses for :class:`~cellsam.models.dense_finder.DenseCellFinder` outputs.

    Args:
        stride: input pixels per map location; weight_dict: weights of ``loss_heatmap``,
            ``loss_size``, ``loss_offset``, ``loss_giou`` for :meth:`total`; ttf_alpha: > 0 for
            TTFNet's Gaussians (see :func:`~cellsam.train.dense_targets.dense_targets`).
    """

    def __init__(self, *, stride: int, weight_dict: dict[str, float], ttf_alpha: float = 0.0) -> None:
        super().__init__()
        if ttf_alpha < 0:
            raise ValueError(f"ttf_alpha must be >= 0, got {ttf_alpha}")
        self.stride = stride
        self.ttf_alpha = ttf_alpha
        self.weight_dict = dict(weight_dict)

    def targets(self, targets: list[dict[str, Tensor]], map_size: tuple[int, int]) -> list[DenseTargets]:
        """Per image: :func:`dense_targets` of its ``boxes`` (cxcywh in [0, 1] of the model input)."""
        side = torch.tensor([map_size[1], map_size[0]] * 2, dtype=torch.float32) * self.stride
        return [dense_targets(box_cxcywh_to_xyxy(t["boxes"].float().reshape(-1, 4)) * side.to(t["boxes"].device),
                              map_size=map_size, stride=self.stride, ttf_alpha=self.ttf_alpha) for t in targets]

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Unweighted losses of a batch: outputs ``heatmap`` (B,1,h,w), ``size`` / ``offset`` (B,2,h,w)."""
        heat, size, offset = outputs["heatmap"], outputs["size"], outputs["offset"]
        if len(targets) != heat.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {heat.shape[0]}")
        dev = heat.device
        tg = [t._replace(**{k: getattr(t, k).to(dev) for k in ("heatmap", "size", "offset", "weight", "box")})
              for t in self.targets(targets, (heat.shape[-2], heat.shape[-1]))]
        num = max(float(sum(t.num_cells for t in tg)), 1.0)
        t_heat = torch.stack([t.heatmap for t in tg])[:, None]
        t_size, t_off = torch.stack([t.size for t in tg]), torch.stack([t.offset for t in tg])
        wt = torch.stack([t.weight for t in tg])[:, None]  # (B,1,h,w)
        loss_heat = centernet_focal_loss(heat.float(), t_heat) / num
        loss_size = (F.l1_loss(size.float(), t_size, reduction="none") * wt).sum() / num
        loss_off = (F.l1_loss(offset.float(), t_off, reduction="none") * wt).sum() / num
        sel = wt[:, 0] > 0
        if bool(sel.any()):
            bi, yi, xi = torch.nonzero(sel, as_tuple=True)
            wh = size.float()[bi, :, yi, xi].exp()
            c = offset.float()[bi, :, yi, xi] + torch.stack([xi, yi], dim=1).float()
            pred = torch.cat([c - wh / 2, c + wh / 2], dim=1)
            true = torch.stack([t.box for t in tg])[bi, :, yi, xi]
            giou = paired_generalized_box_iou(pred, true)
            loss_giou = ((1 - giou) * wt[:, 0][sel]).sum() / num
        else:
            loss_giou = size.sum() * 0.0
        return {"loss_heatmap": loss_heat, "loss_size": loss_size, "loss_offset": loss_off, "loss_giou": loss_giou}

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """``total_loss(losses, self.weight_dict)``."""
        return total_loss(losses, self.weight_dict)
