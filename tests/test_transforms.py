"""Joint augmentations: the area-preserving stretch (rods from round nuclei) and augment()'s contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.draw import disk
from skimage.measure import regionprops

from cellsam.train.config import TrainConfig
from cellsam.train.transforms import AugmentConfig, augment, stretch


def disc_sample(radius: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    lab = np.zeros((128, 160), np.int64)
    lab[disk((64, 80), radius, shape=lab.shape)] = 1
    img = np.stack([np.zeros_like(lab), lab, lab]).astype(np.float32)
    return torch.from_numpy(img), torch.from_numpy(lab)


@pytest.mark.parametrize("angle", [0.0, math.pi / 4, math.pi / 2])
def test_stretch_makes_a_disc_an_ellipse_of_that_aspect_along_that_direction(angle: float) -> None:
    img, lab = disc_sample()
    out_img, out_lab = stretch(img, lab, 4.0, angle)
    assert out_img.shape == img.shape and out_lab.shape == lab.shape and out_lab.dtype == lab.dtype
    r = regionprops(out_lab.numpy().astype(int))[0]
    assert abs(r.area / float(lab.sum()) - 1.0) < 0.05  # area kept
    assert abs(r.axis_major_length / r.axis_minor_length - 4.0) < 0.3
    # the major axis points along `angle` (x to the right, y down): its direction from the moments
    cy, cx = r.centroid
    ys, xs = np.nonzero(out_lab.numpy())
    cov = np.cov(np.stack([xs - cx, ys - cy]))
    vx, vy = np.linalg.eigh(cov)[1][:, -1]
    assert abs(abs(vx * math.cos(angle) + vy * math.sin(angle)) - 1.0) < 0.02
    # image and labels moved together
    assert float(((out_img[2] > 0.5) == (out_lab > 0)).float().mean()) > 0.995
    assert float(out_img[0].abs().max()) == 0.0  # an empty channel stays empty


def test_stretch_by_one_is_the_identity_and_rejects_shrinking() -> None:
    img, lab = disc_sample()
    same_img, same_lab = stretch(img, lab, 1.0, 0.3)
    assert torch.equal(same_lab, lab) and torch.allclose(same_img, img, atol=1e-5)
    with pytest.raises(ValueError, match="stretch"):
        stretch(img, lab, 0.5, 0.0)


def test_augment_stretches_only_when_asked_and_the_config_reads_it() -> None:
    img, lab = disc_sample()
    off = AugmentConfig(flip_p=0, rot90_p=0, scale_p=0, gamma_p=0, contrast_p=0, noise_p=0, blur_p=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(img, lab, off, g)[1], lab)
    on = AugmentConfig(**{**off.__dict__, "stretch_max": 3.0, "stretch_p": 1.0})
    _, out = augment(img, lab, on, torch.Generator().manual_seed(0))
    r = regionprops(out.numpy().astype(int))[0]
    assert 1.1 < r.axis_major_length / r.axis_minor_length < 3.3
    cfg = TrainConfig.from_dict({"stage": "joint", "model": "conv_tiny",
                                 "augment": {"stretch_max": 2.5, "stretch_p": 0.3}})
    assert cfg.augment.stretch_max == 2.5 and cfg.augment.stretch_p == 0.3
