"""Joint augmentations of an image and its instance-label image.

Geometry is applied to the image and the label image together; boxes and per-cell masks are
derived from the transformed label image afterwards (:mod:`cellsam.train.targets`), so image,
boxes and masks can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of every augmentation (all off when ``enabled`` is False)."""

    enabled: bool = True
    flip_p: float = 0.5
    rot90_p: float = 0.5
    scale_range: tuple[float, float] = (0.75, 1.33)
    scale_p: float = 0.5
    gamma_range: tuple[float, float] = (0.7, 1.4)
    gamma_p: float = 0.5
    contrast_range: tuple[float, float] = (0.8, 1.2)
    contrast_p: float = 0.5
    noise_std_max: float = 0.04
    noise_p: float = 0.3
    blur_sigma_max: float = 1.2
    blur_p: float = 0.2
    invert_p: float = 0.0  # swap dark/bright cells (helps bright-field / H&E generalise)
    stretch_max: float = 1.0  # area-preserving stretch by up to this factor along a random direction
    stretch_p: float = 0.0  # (round nuclei become rods and long thin nuclei; off by default)


def augment(image: Tensor, labels: Tensor, cfg: AugmentConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Randomly transform one sample.

    Arguments:
        image: (3,H,W) float32 in [0,1].
        labels: (H,W) int64 instance labels (0 = background).
        cfg: augmentation settings.
        generator: the torch RNG to draw from (seeded per sample for reproducibility).
    Returns:
        image (3,H,W) float32 in [0,1] and labels (H,W) int64 of the same size.
    """
    if not cfg.enabled:
        return image, labels

    def coin(p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=generator)) < p

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    if coin(cfg.flip_p):
        image, labels = image.flip(-1), labels.flip(-1)
    if coin(cfg.flip_p):
        image, labels = image.flip(-2), labels.flip(-2)
    if coin(cfg.rot90_p):
        k = int(torch.randint(1, 4, (), generator=generator))
        image, labels = image.rot90(k, (-2, -1)), labels.rot90(k, (-2, -1))
    if coin(cfg.scale_p):
        s = math.exp(uniform(math.log(cfg.scale_range[0]), math.log(cfg.scale_range[1])))
        image, labels = _rescale_crop(image, labels, s, generator)
    if cfg.stretch_max > 1.0 and coin(cfg.stretch_p):
        image, labels = stretch(image, labels, uniform(1.0, cfg.stretch_max), uniform(0.0, math.pi))
    image = _intensity(image, cfg, coin, uniform, generator)
    return image.contiguous(), labels.contiguous()


def _rescale_crop(image: Tensor, labels: Tensor, scale: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Zoom by ``scale`` then crop (zoom in) or zero-pad (zoom out) back to the input size."""
    h, w = labels.shape
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0].clamp(0, 1)
    lab = F.interpolate(labels[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
    if nh >= h and nw >= w:
        y0 = int(torch.randint(0, nh - h + 1, (), generator=generator))
        x0 = int(torch.randint(0, nw - w + 1, (), generator=generator))
        return img[:, y0 : y0 + h, x0 : x0 + w], lab[y0 : y0 + h, x0 : x0 + w]
    out_img = image.new_zeros(image.shape)
    out_lab = labels.new_zeros(labels.shape)
    ch, cw = min(nh, h), min(nw, w)
    y0 = int(torch.randint(0, h - ch + 1, (), generator=generator))
    x0 = int(torch.randint(0, w - cw + 1, (), generator=generator))
    out_img[:, y0 : y0 + ch, x0 : x0 + cw] = img[:, :ch, :cw]
    out_lab[y0 : y0 + ch, x0 : x0 + cw] = lab[:ch, :cw]
    return out_img, out_lab


def stretch(image: Tensor, labels: Tensor, factor: float, angle: float) -> tuple[Tensor, Tensor]:
    """Stretch by ``factor`` along the direction ``angle`` (radians from +x) about the centre, keeping areas.

    Lengths along ``angle`` grow by ``sqrt(factor)`` and across it shrink by ``sqrt(factor)``, so a disc
    becomes an ellipse of aspect ratio ``factor``. Image bilinear, labels nearest; what leaves the frame is
    cut and what enters is zero (background).

    Args:
        image: (C, H, W) float; labels: (H, W) int64.
    Returns:
        image (C, H, W) and labels (H, W) of the same size.
    """
    if factor < 1.0:
        raise ValueError(f"stretch factor must be >= 1, got {factor}")
    h, w = labels.shape
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    inv_scale = torch.diag(torch.tensor([factor ** -0.5, factor ** 0.5], dtype=torch.float64))
    # output pixel -> input pixel, in pixel units about the centre (grid_sample's normalised axes differ by w/h)
    m = rot @ inv_scale @ rot.T
    to_norm = torch.diag(torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64))
    theta = (to_norm @ m @ torch.linalg.inv(to_norm)).to(torch.float32)
    grid = F.affine_grid(torch.cat([theta, theta.new_zeros(2, 1)], 1)[None], [1, 1, h, w], align_corners=False)
    img = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    lab = F.grid_sample(labels[None, None].double(), grid.double(), mode="nearest", padding_mode="zeros",
                        align_corners=False)[0, 0]
    return img.clamp(0, 1).to(image.dtype), lab.round().to(labels.dtype)


def _intensity(
    image: Tensor,
    cfg: AugmentConfig,
    coin: Callable[[float], bool],
    uniform: Callable[[float, float], float],
    generator: torch.Generator,
) -> Tensor:
    present = image.flatten(1).amax(1) > 0  # leave empty channels empty
    x = image
    if coin(cfg.invert_p):
        x = torch.where(present[:, None, None], 1.0 - x, x)
    if coin(cfg.gamma_p):
        x = x.clamp_min(0).pow(uniform(*cfg.gamma_range))
    if coin(cfg.contrast_p):
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = (x - mean) * uniform(*cfg.contrast_range) + mean
    if coin(cfg.blur_p):
        x = _gaussian_blur(x, uniform(0.3, cfg.blur_sigma_max))
    if coin(cfg.noise_p):
        std = uniform(0.0, cfg.noise_std_max)
        x = x + std * torch.randn(x.shape, generator=generator)
    x = x.clamp(0, 1)
    return torch.where(present[:, None, None], x, torch.zeros_like(x))


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    x4 = x[None]
    x4 = F.conv2d(F.pad(x4, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    x4 = F.conv2d(F.pad(x4, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    return x4[0]
