"""Dense CellFinder: every cell as one peak of a centre heatmap (CenterNet), no NMS.

On the stride-4 trunk of the convolutional encoder, per location:

* ``heatmap`` (B,1,h,w) logits: sigmoid = the chance that a cell's box centre falls in this location;
* ``size`` (B,2,h,w): log(w / stride), log(h / stride) of that cell's box (log space: one head covers
  cells from ~4 px to ~200 px);
* ``offset`` (B,2,h,w): the centre's position in map units relative to the location's corner
  (``centre / stride - index``; in [0, 1) at the peak).

Decoding (:meth:`DenseCellFinder.postprocess`) keeps the local maxima of the sigmoid heatmap (a
``peak_kernel`` max-pool), above the box threshold, at most ``max_detections`` per image: one box per
cell. It returns what the Anchor-DETR CellFinder's ``postprocess`` returns, so inference, the
Predictor, the server and the Dask path use either detector unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellsam.config import DenseFinderConfig, FlipTest
from cellsam.ops.boxes import clip_boxes

__all__ = ["FLIP_TEST_VIEWS", "DenseCellFinder", "decode_dense", "mean_of_views", "unmirror"]

# per flip test (cellsam.config.FLIP_TESTS), the extra views: the dims of a (B,C,H,W) tensor each mirrors
# (-1: left-right, -2: up-down; both: the 180-degree turn)
FLIP_TEST_VIEWS: dict[FlipTest, tuple[tuple[int, ...], ...]] = {
    "off": (), "mirrors": ((-1,), (-2,)), "rot180": ((-2, -1),)}


def _head(cin: int, mid: int, cout: int, *, bias: float) -> nn.Sequential:
    """conv 3x3 -> ReLU -> conv 1x1, the last convolution's bias set to ``bias``."""
    hidden = nn.Conv2d(cin, mid, 3, padding=1)
    out = nn.Conv2d(mid, cout, 1)
    assert out.bias is not None  # Conv2d's default bias=True
    nn.init.constant_(out.bias, bias)
    return nn.Sequential(hidden, nn.ReLU(inplace=True), out)


class DenseCellFinder(nn.Module):
    """CenterNet head: heatmap, size and offset branches on the trunk (B, in_channels, S/4, S/4)."""

    def __init__(self, cfg: DenseFinderConfig, *, in_channels: int) -> None:
        super().__init__()
        if not isinstance(cfg, DenseFinderConfig):
            raise TypeError(f"cfg must be a DenseFinderConfig, got {type(cfg).__name__}")
        if in_channels < 1 or cfg.peak_kernel < 1 or cfg.peak_kernel % 2 == 0 or cfg.max_detections < 1:
            raise ValueError("in_channels and max_detections must be >= 1 and peak_kernel odd")
        self.cfg = cfg
        self.in_channels = in_channels
        c = cfg.head_channels
        self.heatmap = _head(in_channels, c, 1, bias=-math.log((1 - cfg.prior_prob) / cfg.prior_prob))
        self.size = _head(in_channels, c, 2, bias=math.log(4.0))  # 16-pixel boxes at stride 4
        self.offset = _head(in_channels, c, 2, bias=0.5)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        """(B, in_channels, h, w) -> ``heatmap`` (B,1,h,w) logits, ``size`` (B,2,h,w), ``offset`` (B,2,h,w)."""
        if features.ndim != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"expected features (B, {self.in_channels}, h, w), got {tuple(features.shape)}")
        return {"heatmap": self.heatmap(features), "size": self.size(features), "offset": self.offset(features)}

    @torch.no_grad()
    def postprocess(self, outputs: dict, *, image_size: int, box_threshold: float) -> list[dict[str, Tensor]]:
        """Scored pixel boxes per image (see :func:`decode_dense`)."""
        return decode_dense(outputs, image_size=image_size, box_threshold=box_threshold, stride=self.cfg.stride,
                            kernel=self.cfg.peak_kernel, max_detections=self.cfg.max_detections)


def decode_dense(outputs: dict, *, image_size: int, box_threshold: float, stride: int, kernel: int = 3,
                 max_detections: int = 1000) -> list[dict[str, Tensor]]:
    """Heatmap peaks -> boxes, one per peak, no NMS.

    Args:
        outputs: ``heatmap`` (B,1,h,w) logits, ``size`` (B,2,h,w) log(w, h / stride), ``offset`` (B,2,h,w).
        image_size: side S of the image the boxes refer to; box_threshold: keep peaks whose sigmoid is
            strictly greater; stride: pixels of S per map location; kernel: the max-pool's side;
            max_detections: at most this many peaks per image (the highest).
    Returns:
        per image: ``scores`` (N,) descending, ``boxes`` (N,4) xyxy pixels clipped to [0, S],
        ``labels`` (N,) zeros.
    """
    heat, size, offset = outputs["heatmap"], outputs["size"], outputs["offset"]
    if heat.ndim != 4 or heat.shape[1] != 1 or size.shape != (heat.shape[0], 2, *heat.shape[-2:]) \
            or offset.shape != size.shape:
        raise ValueError(f"bad outputs: heatmap {tuple(heat.shape)}, size {tuple(size.shape)}, "
                         f"offset {tuple(offset.shape)}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    prob = heat.float().sigmoid()
    peaks = (F.max_pool2d(prob, kernel, stride=1, padding=kernel // 2) == prob) & (prob > box_threshold)
    w = heat.shape[-1]
    results = []
    for b in range(heat.shape[0]):
        flat = torch.where(peaks[b, 0].flatten(), prob[b, 0].flatten(), torch.zeros((), device=prob.device))
        k = min(max_detections, int(peaks[b].sum()))
        scores, idx = torch.topk(flat, k, sorted=True)
        ys, xs = (idx // w).float(), (idx % w).float()
        off = offset[b].float().flatten(1)[:, idx]  # (2, N)
        wh = size[b].float().flatten(1)[:, idx].clamp(max=math.log(4.0 * image_size / stride)).exp() * stride
        cx, cy = (xs + off[0]) * stride, (ys + off[1]) * stride
        boxes = torch.stack([cx - wh[0] / 2, cy - wh[1] / 2, cx + wh[0] / 2, cy + wh[1] / 2], dim=1)
        results.append({"scores": scores, "boxes": clip_boxes(boxes, size=image_size),
                        "labels": torch.zeros(k, dtype=torch.long, device=heat.device)})
    return results


def unmirror(outputs: dict[str, Tensor], dims: tuple[int, ...]) -> dict[str, Tensor]:
    """The maps of an image mirrored along ``dims`` (-1: left-right, -2: up-down) -> the image's maps.

    Every map is mirrored back; sizes are unchanged by a mirror, and an offset ``o`` along a mirrored axis
    becomes ``1 - o``: a centre at ``x / stride = j + o`` lies at ``(w - 1 - j) + (1 - o)`` in the mirror.

    Args:
        outputs: ``heatmap`` (B,1,h,w) logits, ``size`` (B,2,h,w), ``offset`` (B,2,h,w) of the mirrored image.
    Returns:
        the same maps in the frame of the image as it is.
    """
    if any(d not in (-1, -2) for d in dims):
        raise ValueError(f"dims must be among (-1, -2), got {dims}")
    offset = outputs["offset"].flip(dims).clone()
    for d in dims:
        axis = 0 if d == -1 else 1  # offset channel 0 is x, 1 is y
        offset[:, axis] = 1.0 - offset[:, axis]
    return {"heatmap": outputs["heatmap"].flip(dims), "size": outputs["size"].flip(dims), "offset": offset}


def mean_of_views(views: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The mean maps of several views of one image (each in the image's frame, see :func:`unmirror`).

    The heatmap is averaged as probabilities (returned as their logits), sizes in log space, offsets as
    they are. Shapes as in :func:`decode_dense`.
    """
    if not views:
        raise ValueError("no views to average")
    prob = torch.stack([v["heatmap"].float().sigmoid() for v in views]).mean(0)
    eps = torch.finfo(prob.dtype).eps
    return {"heatmap": torch.logit(prob.clamp(eps, 1 - eps)),
            "size": torch.stack([v["size"].float() for v in views]).mean(0),
            "offset": torch.stack([v["offset"].float() for v in views]).mean(0)}
