"""CellFinder: the Anchor-DETR cell detector on the ViT trunk features.

``CellFinder(cfg, in_channels=C)``: ``input_proj`` (1x1 conv C -> d_model + GroupNorm) then
:class:`~cellsam.models.detr_transformer.AnchorDETRTransformer`. Input: trunk features (B, C, h, w)
(the SAM ViT before its neck); output: per-query sigmoid class logits and cxcywh boxes in [0, 1].

Importing the official CellSAM checkpoint (``cellfinder.decode_head.*``) is a key mapping:

=============================================================  ==========================================
official key                                                   ours (relative to ``CellFinder``)
=============================================================  ==========================================
``cellfinder.decode_head.input_proj.0.{0,1}.*``                ``input_proj.{0,1}.*`` (conv, GroupNorm)
``cellfinder.decode_head.transformer.class_embed.0.*``         ``transformer.class_embed.*``
``cellfinder.decode_head.transformer.bbox_embed.0.layers.*``   ``transformer.bbox_embed.layers.*``
``cellfinder.decode_head.transformer.class_embed.{1..5}.*``    dropped (the same shared head, 5 more times)
``cellfinder.decode_head.transformer.bbox_embed.{1..5}.*``     dropped (idem)
``cellfinder.decode_head.transformer.<rest>``                  ``transformer.<rest>`` unchanged
                                                               (encoder_layers, decoder_layers, pattern,
                                                               position, adapt_pos2d, adapt_pos1d)
``cellfinder.decode_head.backbone.body.*``                     not here: the detector trunk (a ViT)
=============================================================  ==========================================

The official checkpoint uses ``num_classes=2``, 3500 learned anchors, 1 pattern, RCDA, d_model 256.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cellsam.config import CellFinderConfig
from cellsam.models.detr_transformer import AnchorDETRTransformer
from cellsam.ops.boxes import box_cxcywh_to_xyxy, clip_boxes

__all__ = ["CellFinder"]


def _group_count(channels: int, max_groups: int = 32) -> int:
    """Largest number of groups <= max_groups that divides ``channels``."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class CellFinder(nn.Module):
    """Anchor-DETR detector: input projection + RCDA transformer with shared heads.

    Args:
        cfg: detector architecture.
        in_channels: channels C of the trunk features it is fed (the encoder's ``embed_dim``).
    """

    def __init__(self, cfg: CellFinderConfig, *, in_channels: int) -> None:
        super().__init__()
        if not isinstance(cfg, CellFinderConfig):
            raise TypeError(f"cfg must be a CellFinderConfig, got {type(cfg).__name__}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.cfg = cfg
        self.in_channels = in_channels
        d = cfg.d_model
        proj = nn.Conv2d(in_channels, d, kernel_size=1)
        self.input_proj = nn.Sequential(proj, nn.GroupNorm(_group_count(d), d))
        nn.init.xavier_uniform_(proj.weight, gain=1)
        assert proj.bias is not None  # Conv2d's default bias=True
        nn.init.zeros_(proj.bias)
        self.transformer = AnchorDETRTransformer(
            d_model=d,
            nhead=cfg.nheads,
            num_encoder_layers=cfg.enc_layers,
            num_decoder_layers=cfg.dec_layers,
            dim_feedforward=cfg.dim_feedforward,
            dropout=cfg.dropout,
            activation=cfg.activation,
            num_query_position=cfg.num_query_position,
            num_query_pattern=cfg.num_query_pattern,
            num_classes=cfg.num_classes,
            spatial_prior=cfg.spatial_prior,
            attention_type=cfg.attention_type,
            prior_prob=cfg.prior_prob,
            pos_scale=cfg.pos_scale,
            query_content=cfg.query_content,
        )

    @property
    def num_queries(self) -> int:
        """Q = num_query_position * num_query_pattern."""
        return self.transformer.num_queries

    def forward(self, features: Tensor) -> dict[str, Tensor | list[dict[str, Tensor]]]:
        """Detect cells.

        Args:
            features: (B, C, h, w) trunk features, C = ``in_channels``.

        Returns:
            ``pred_logits`` (B, Q, K) class logits (sigmoid, no background class), ``pred_boxes``
            (B, Q, 4) cxcywh in [0, 1], ``anchors`` (Q, 2) each query's anchor point (x, y) in [0, 1]
            (used by the training losses), and when ``cfg.aux_loss`` ``aux_outputs``: a list of
            dec_layers - 1 dicts with ``pred_logits`` and ``pred_boxes`` for the earlier decoder layers.
        """
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"expected features (B, {self.in_channels}, h, w), got {tuple(features.shape)}")
        logits, boxes = self.transformer(self.input_proj(features))
        out: dict[str, Tensor | list[dict[str, Tensor]]]
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "anchors": self.transformer.anchors()}
        if self.cfg.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out

    @torch.no_grad()
    def postprocess(self, outputs: dict, *, image_size: int, box_threshold: float) -> list[dict[str, Tensor]]:
        """Turn raw outputs into scored pixel boxes, per image. No NMS, no top-k cap beyond Q.

        Args:
            outputs: the dict returned by :meth:`forward` (only ``pred_logits``, ``pred_boxes`` are used).
            image_size: side S of the square image the boxes refer to (boxes are scaled by S).
            box_threshold: keep queries whose score is strictly greater.

        Returns:
            One dict per image: ``scores`` (N,) = max over classes of the sigmoid, sorted descending;
            ``boxes`` (N, 4) xyxy pixels clipped to [0, S]; ``labels`` (N,) int64 argmax class.
        """
        return postprocess_detections(outputs, image_size=image_size, box_threshold=box_threshold)


def postprocess_detections(
    outputs: dict, *, image_size: int, box_threshold: float
) -> list[dict[str, Tensor]]:
    """See :meth:`CellFinder.postprocess`."""
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.ndim != 3 or boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(f"bad outputs: pred_logits {tuple(logits.shape)}, pred_boxes {tuple(boxes.shape)}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    results = []
    for lg, bx in zip(logits.float(), boxes.float(), strict=True):
        scores, labels = lg.sigmoid().max(dim=-1)
        keep = torch.nonzero(scores > box_threshold).squeeze(1)
        order = torch.argsort(scores[keep], descending=True, stable=True)
        keep = keep[order]
        xyxy = clip_boxes(box_cxcywh_to_xyxy(bx[keep]) * image_size, size=image_size)
        results.append({"scores": scores[keep], "boxes": xyxy, "labels": labels[keep]})
    return results
