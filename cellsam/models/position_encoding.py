"""Sine position encodings of normalised coordinates, as used by Anchor DETR.

Positions are in [0, 1]; they are multiplied by 2*pi and divided by ``temperature ** (2*(i//2)/F)``
for feature i of F, then sin is taken on even and cos on odd features (interleaved: sin0, cos0,
sin1, cos1, ...). The feature order matters for weight compatibility with Anchor DETR checkpoints,
whose ``adapt_pos1d`` / ``adapt_pos2d`` MLPs consume these encodings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pixel_centre_positions", "pos2posemb1d", "pos2posemb2d"]


def _sine(pos: Tensor, num_pos_feats: int, temperature: float) -> Tensor:
    """(...) -> (..., num_pos_feats) interleaved sin/cos of ``pos * 2*pi``."""
    if num_pos_feats <= 0 or num_pos_feats % 2:
        raise ValueError(f"num_pos_feats must be a positive even number, got {num_pos_feats}")
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    x = pos.float()[..., None] * (2 * math.pi) / dim_t
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def pos2posemb1d(pos: Tensor, *, num_pos_feats: int = 256, temperature: float = 10000.0,
                 scale: float = 1.0) -> Tensor:
    """Encode 1-D positions: (...) in [0, 1] -> (..., num_pos_feats) float32 (``pos * scale`` encoded)."""
    return _sine(pos * scale, num_pos_feats, temperature)


def pos2posemb2d(pos: Tensor, *, num_pos_feats: int = 128, temperature: float = 10000.0,
                 scale: float = 1.0) -> Tensor:
    """Encode 2-D points: (..., 2) as (x, y) in [0, 1] -> (..., 2 * num_pos_feats), ordered [y, x]."""
    if pos.shape[-1] != 2:
        raise ValueError(f"pos must end in a dimension of size 2 (x, y), got shape {tuple(pos.shape)}")
    emb_x = _sine(pos[..., 0] * scale, num_pos_feats, temperature)
    emb_y = _sine(pos[..., 1] * scale, num_pos_feats, temperature)
    return torch.cat((emb_y, emb_x), dim=-1)


def pixel_centre_positions(length: int, *, device: torch.device | None = None) -> Tensor:
    """Normalised centres ``(i + 0.5) / length`` of ``length`` pixels -> (length,) float32.

    Equal to Anchor DETR's ``mask2pos`` for an image without padding.
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    return (torch.arange(length, dtype=torch.float32, device=device) + 0.5) / length
