"""A convolutional multi-scale image encoder that learns from a few hundred images on a CPU.

    image (B,3,S,S) -> stem (stride 2) -> residual stages (strides 2, 4, 8, 16, 32)
        -> top-down path (U-Net / FPN: upsample, add the lateral skip, 3x3 conv) to stride 4
        -> trunk (B, decoder_widths[0], S/4, S/4)       -> the dense CellFinder
        -> neck  (B, out_chans, S/patch, S/patch)       -> SAM prompt encoder + mask decoder

It has the interface of :class:`~cellsam.models.image_encoder.ImageEncoderViT`: ``forward`` returns an
:class:`EncoderOutput`, ``forward_trunk`` the trunk only and ``neck`` maps the trunk to the embedding,
so one encoder pass serves both heads and the masks stage can freeze the trunk. Batch norm and ReLU,
as the U-Nets of Cellpose and StarDist that learn on small budgets; ``style`` adds Cellpose's global
style vector (the mean of the deepest stage, projected) to every top-down level.
"""

from __future__ import annotations

import math
from typing import TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellsam.config import ConvEncoderConfig, EncoderConfig
from cellsam.models.common import LayerNorm2d
from cellsam.models.image_encoder import EncoderOutput

__all__ = ["ConvBN", "ConvEncoder", "set_fast_inference"]

M = TypeVar("M", bound=nn.Module)


class ConvBN(nn.Sequential):
    """3x3 convolution (no bias) + batch norm (+ ReLU): modules ``0``, ``1`` (and ``2``), the state-dict keys
    of ``nn.Sequential``. Out of training mode the batch norm is folded into the convolution's weights and
    bias at each call (same outputs to float rounding; one convolution instead of two passes), unless
    ``fast_inference`` is False (see :func:`set_fast_inference`)."""

    def __init__(self, cin: int, cout: int, *, stride: int = 1, relu: bool = True) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                   nn.BatchNorm2d(cout)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.fast_inference = True

    def forward(self, x: Tensor) -> Tensor:
        conv, bn = cast(nn.Conv2d, self[0]), cast(nn.BatchNorm2d, self[1])
        plain = self.training or not self.fast_inference or not bn.affine
        if plain or bn.running_mean is None or bn.running_var is None:
            return cast(Tensor, super().forward(x))
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        y = F.conv2d(x, conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale,
                     conv.stride, conv.padding)
        return F.relu(y, inplace=True) if len(self) > 2 else y


def set_fast_inference(model: M, enabled: bool) -> M:
    """Switch the conv encoder's inference path in ``model`` (in place; returns it): batch norm folded into
    the convolutions (:class:`ConvBN`) and channels-last stages (:class:`ConvEncoder`), out of training
    mode. Both change results at float rounding only. Training turns them off, so that a frozen trunk in
    eval mode (the masks stage) and the size fit's features keep the plain arithmetic and a recipe gives
    the same weights bit for bit as before the fast path existed."""
    for m in model.modules():
        if isinstance(m, (ConvBN, ConvEncoder)):
            m.fast_inference = enabled
    return model


def conv_bn(cin: int, cout: int, *, stride: int = 1, relu: bool = True) -> ConvBN:
    """3x3 convolution (no bias) + batch norm (+ ReLU), see :class:`ConvBN`."""
    return ConvBN(cin, cout, stride=stride, relu=relu)


class ResBlock(nn.Module):
    """ResNet basic block: x + BN(conv(ReLU(BN(conv(x))))), then ReLU; same width and size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        first = conv_bn(channels, channels)
        last = conv_bn(channels, channels, relu=False)
        self.body = nn.Sequential(first, last)
        nn.init.zeros_(cast(nn.BatchNorm2d, last[1]).weight)  # each block starts as the identity (zero-init last BN)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.body(x))


class Stage(nn.Module):
    """Downsample x2 (strided 3x3 conv, new width) then ``depth`` residual blocks."""

    def __init__(self, cin: int, cout: int, depth: int) -> None:
        super().__init__()
        self.down = conv_bn(cin, cout, stride=2)
        self.blocks = nn.Sequential(*[ResBlock(cout) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.down(x))


class TopDown(nn.Module):
    """One top-down level: lateral 1x1 of the skip + the upsampled coarser level (+ style), 3x3 conv."""

    def __init__(self, skip: int, coarse: int, out: int, style: int) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(skip, out, 1)
        self.reduce = nn.Conv2d(coarse, out, 1)
        self.style = nn.Linear(style, out) if style else None
        self.fuse = conv_bn(out, out)

    def forward(self, skip: Tensor, coarse: Tensor, style: Tensor | None) -> Tensor:
        up = F.interpolate(self.reduce(coarse), size=skip.shape[-2:], mode="nearest")
        x = self.lateral(skip) + up
        if self.style is not None and style is not None:
            x = x + self.style(style)[:, :, None, None]
        return self.fuse(x)


def _style(deepest: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C): the spatial mean, L2-normalised."""
    style = deepest.mean(dim=(-2, -1))
    return style / style.norm(dim=1, keepdim=True).clamp_min(1e-6)


class ConvEncoder(nn.Module):
    """See the module docstring.

    Args:
        cfg: the encoder's sizes (``img_size`` S, ``patch_size`` = the embedding's stride, ``out_chans``).
        conv: the stages and the top-down path.
    """

    def __init__(self, cfg: EncoderConfig, conv: ConvEncoderConfig) -> None:
        super().__init__()
        if len(conv.widths) != len(conv.blocks) or len(conv.widths) < 3:
            raise ValueError(f"widths and blocks must have the same length >= 3, got {conv.widths}, {conv.blocks}")
        n_dec = len(conv.decoder_widths)
        if not 1 <= n_dec <= len(conv.widths) - 2:
            raise ValueError(f"decoder_widths: 1 to {len(conv.widths) - 2} levels (strides 4 ...), got {n_dec}")
        emb_stride = cfg.patch_size
        if emb_stride < 4 or emb_stride & (emb_stride - 1) or cfg.img_size % emb_stride:
            raise ValueError(f"patch_size (the embedding's stride) must be a power of 2 >= 4 dividing img_size, "
                             f"got {emb_stride} for img_size {cfg.img_size}")
        self.cfg, self.conv_cfg = cfg, conv
        self.fast_inference = True  # see set_fast_inference
        w = conv.widths
        self.stem = nn.Sequential(conv_bn(cfg.in_chans, w[0], stride=2),
                                  *[ResBlock(w[0]) for _ in range(conv.blocks[0])])
        self.stages = nn.ModuleList(Stage(w[i - 1], w[i], conv.blocks[i]) for i in range(1, len(w)))
        style = w[-1] if conv.style else 0
        # top-down from the deepest level to stride 4 (level index 1 of the stem + stages)
        levels = list(range(len(w) - 2, 0, -1))  # skip levels, coarse to fine; level i has stride 2**(i+1)
        outs = {1 + j: c for j, c in enumerate(conv.decoder_widths)}  # level -> decoder width
        self.topdown = nn.ModuleList()
        coarse = w[-1]
        for lvl in levels:
            out = outs.get(lvl, w[lvl])
            self.topdown.append(TopDown(w[lvl], coarse, out, style))
            coarse = out
        self.trunk_chans = conv.decoder_widths[0]
        down = int(math.log2(emb_stride // 4))  # stride-2 convs from the trunk to the embedding
        neck: list[nn.Module] = []
        c = self.trunk_chans
        for _ in range(down):
            neck += [nn.Conv2d(c, cfg.out_chans, 3, stride=2, padding=1, bias=False), LayerNorm2d(cfg.out_chans)]
            c = cfg.out_chans
        neck += [nn.Conv2d(c, cfg.out_chans, 1, bias=False), LayerNorm2d(cfg.out_chans),
                 nn.Conv2d(cfg.out_chans, cfg.out_chans, 3, padding=1, bias=False), LayerNorm2d(cfg.out_chans)]
        self.neck = nn.Sequential(*neck)

    def forward_trunk(self, x: Tensor) -> Tensor:
        """(B,3,S,S) preprocessed images -> (B, trunk_chans, S/4, S/4) detector features."""
        s = self.cfg.img_size
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans or x.shape[-2:] != (s, s):
            raise ValueError(f"expected images (B, {self.cfg.in_chans}, {s}, {s}), got {tuple(x.shape)}")
        feats = self._stages(x)
        style = _style(feats[-1]) if self.conv_cfg.style else None
        y = feats[-1]
        for block, skip in zip(self.topdown, reversed(feats[1:-1]), strict=True):
            y = block(skip, y, style)
        return y

    def _stages(self, x: Tensor) -> list[Tensor]:
        if not self.training and self.fast_inference:  # channels-last: 1.2x faster on the 2-core CPU
            x = x.contiguous(memory_format=torch.channels_last)
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats

    @property
    def size_feature_chans(self) -> int:
        """Length of :meth:`size_features`."""
        return 2 * sum(self.conv_cfg.widths[1:])

    def size_features(self, x: Tensor) -> Tensor:
        """(B,3,S,S) preprocessed images -> (B, size_feature_chans): per stage from stride 4 on, the
        L2-normalised spatial mean (Cellpose's style vector, at every depth) and the log of the mean
        absolute activation; the size model reads them (the stages only, no top-down path).

        Measured with cellsam_cpu.v3 on 1,000 training crops at 0.35x-3x: held-out error of the log
        diameter 0.26 with these features vs 0.39 with the deepest stage's style vector alone."""
        s = self.cfg.img_size
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans or x.shape[-2:] != (s, s):
            raise ValueError(f"expected images (B, {self.cfg.in_chans}, {s}, {s}), got {tuple(x.shape)}")
        feats = self._stages(x)[1:]
        means = [_style(f) for f in feats]
        levels = [torch.log(f.float().abs().mean(dim=(-2, -1)) + 1e-3) for f in feats]
        return torch.cat(means + levels, dim=1)

    def forward(self, x: Tensor) -> EncoderOutput:
        """One pass: ``trunk`` (B, trunk_chans, S/4, S/4) and ``embedding`` (B, out_chans, h, w)."""
        trunk = self.forward_trunk(x)
        return EncoderOutput(trunk=trunk.contiguous(), embedding=self.neck(trunk).contiguous())
