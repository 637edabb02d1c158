"""Training targets of the dense CellFinder: boxes -> centre heatmap, sizes and offsets (CenterNet).

Each cell's box centre ``c`` (map units = pixels / stride) falls in location ``floor(c)``, its peak:
the heatmap is 1 there and a Gaussian around it whose radius follows the box size (CenterNet's
``gaussian_radius``); the heatmap is the maximum over cells. Size and offset are supervised where a
cell owns the heatmap (its Gaussian is the largest there) and its Gaussian is at least ``min_weight``;
always at its peak.

With ``ttf_alpha > 0`` the Gaussians follow TTFNet (Liu et al., "Training-Time-Friendly Network for
Real-Time Object Detection", 2020) instead: each cell's heatmap Gaussian is elliptical and spans
``ttf_alpha`` x its box on each axis (radius ``floor(alpha * w / 2)``, sigma ``(2 r + 1) / 6``), and
size, offset and box are supervised at every location of that window the cell owns, weighted by its
Gaussian normalised to sum 1 per cell. CenterNet's radius keeps IoU >= 0.7 under a shift, which for a
cell under ~60 px wide at stride 4 is zero: one positive location, every neighbour a full negative, and
one location that learns its size. TTFNet's spread gives each cell several locations that learn its box.
:func:`~cellsam.models.dense_finder.decode_dense` inverts this exactly at the peaks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["DenseTargets", "dense_targets", "gaussian_radius"]


class DenseTargets(NamedTuple):
    """Target maps of one image (map side h x w).

    Attributes:
        heatmap: (h,w) in [0,1], exactly 1 at each cell's peak.
        size: (2,h,w) log(box w / stride), log(box h / stride) of the owning cell.
        offset: (2,h,w) centre / stride - location index (x, y) of the owning cell.
        weight: (h,w) the owner's Gaussian where size/offset are supervised, else 0.
        box: (4,h,w) the owner's box, xyxy in map units (for box losses).
        num_cells: cells with a peak in the map.
    """

    heatmap: Tensor
    size: Tensor
    offset: Tensor
    weight: Tensor
    box: Tensor
    num_cells: int


def gaussian_radius(w: Tensor, h: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CenterNet's Gaussian radius (map units) of (N,) boxes w x h, as its reference code computes it.

    Of CornerNet's three cases it takes the larger root of the first two quadratics, so the third
    usually sets the radius: a box grown by the radius on every side keeps IoU >= ``min_overlap``
    with the true one (about 0.1 x the side at 0.7).
    """
    b1, c1 = h + w, w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt((b1**2 - 4 * c1).clamp_min(0))) / 2
    b2, c2 = 2 * (h + w), (1 - min_overlap) * w * h
    r2 = (b2 + torch.sqrt((b2**2 - 16 * c2).clamp_min(0))) / 8
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (h + w), (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt((b3**2 - 4 * a3 * c3).clamp_min(0))) / (2 * a3)
    return torch.minimum(torch.minimum(r1, r2), r3).clamp_min(0)


def dense_targets(boxes: Tensor, *, map_size: tuple[int, int], stride: int, min_overlap: float = 0.7,
                  min_weight: float = 0.3, ttf_alpha: float = 0.0) -> DenseTargets:
    """Target maps for one image.

    Args:
        boxes: (M,4) xyxy pixels of the model input (map side x stride).
        map_size: (h, w) of the heatmap; stride: input pixels per map location.
        min_overlap: IoU that sets each Gaussian's radius; min_weight: supervise size/offset where
            the owner's Gaussian is at least this (and at its peak).
        ttf_alpha: > 0: TTFNet's Gaussians spanning this fraction of each box, regression at every
            location of them (``min_overlap`` and ``min_weight`` unused); 0: CenterNet's.
    Returns:
        :class:`DenseTargets`; cells whose centre lies outside the map are skipped.
    """
    h, w = map_size
    dev = boxes.device
    b = boxes.float().reshape(-1, 4) / stride
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    b, cx, cy = b[inside], cx[inside], cy[inside]
    n = b.shape[0]
    heat = torch.zeros(h, w, device=dev)
    size = torch.zeros(2, h, w, device=dev)
    offset = torch.zeros(2, h, w, device=dev)
    weight = torch.zeros(h, w, device=dev)
    box = torch.zeros(4, h, w, device=dev)
    if n == 0:
        return DenseTargets(heat, size, offset, weight, box, 0)
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    px, py = cx.floor(), cy.floor()  # each cell's peak location
    if ttf_alpha > 0:
        rx, ry = (ttf_alpha * bw / 2).floor(), (ttf_alpha * bh / 2).floor()
    else:
        rx = ry = gaussian_radius(bw, bh, min_overlap).floor()
    ys = torch.arange(h, device=dev, dtype=torch.float32)[None, :, None]
    xs = torch.arange(w, device=dev, dtype=torch.float32)[None, None, :]
    dx, dy = xs - px[:, None, None], ys - py[:, None, None]
    sx, sy = ((2 * rx + 1) / 6)[:, None, None], ((2 * ry + 1) / 6)[:, None, None]
    g = torch.exp(-(dx**2) / (2 * sx**2) - dy**2 / (2 * sy**2))
    window = (dx.abs() <= rx[:, None, None]) & (dy.abs() <= ry[:, None, None])
    g = torch.where(window, g, torch.zeros((), device=dev))  # (n,h,w); 1 at the peak
    best, owner = g.max(dim=0)
    heat = best
    pix = torch.arange(n, device=dev)
    sup = best > 0 if ttf_alpha > 0 else best >= min_weight
    weight = torch.where(sup, best, torch.zeros((), device=dev))
    # peaks are always supervised by their own cell (a later cell on the same location wins)
    owner[py.long(), px.long()] = pix
    weight[py.long(), px.long()] = 1.0
    heat[py.long(), px.long()] = 1.0
    if ttf_alpha > 0:  # each cell's weights sum to 1
        total = torch.zeros(n, device=dev).index_add_(0, owner.flatten(), weight.flatten())
        weight = weight / total[owner].clamp_min(1e-12)
    size = torch.stack([torch.log(bw.clamp_min(1.0 / stride)), torch.log(bh.clamp_min(1.0 / stride))])[:, owner]
    offset = torch.stack([cx[owner] - xs[0], cy[owner] - ys[0]])
    box = b.t()[:, owner]
    return DenseTargets(heat, size, offset, weight, box, int(torch.unique(py * w + px).numel()))

