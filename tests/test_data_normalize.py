"""Normalisation and channel rules (cellsam.data.normalize)."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam.data.normalize import normalize_channel, normalize_image, rgb_to_channel, to_cellsam_channels


def test_normalize_range_and_dtype(rng: np.random.Generator) -> None:
    x = rng.integers(0, 4000, (64, 80)).astype(np.uint16)
    y = normalize_channel(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0 and y.max() <= 1 and y.max() > 0.9


@pytest.mark.parametrize("value", [0, 7, 1000.5])
def test_constant_channel_gives_zeros(value: float) -> None:
    y = normalize_channel(np.full((32, 32), value))
    assert y.dtype == np.float32 and not np.isnan(y).any() and (y == 0).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_raise(bad: float) -> None:
    x = np.ones((16, 16))
    x[3, 4] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        normalize_channel(x)


def test_clip_at_999_percentile_of_nonzero() -> None:
    x = np.zeros((100, 100))
    x[:50] = np.linspace(1, 100, 5000).reshape(50, 100)
    x[0, 0] = 1e6  # one hot pixel must not squash the rest
    y = normalize_channel(x, clahe=False)
    assert y[0, 0] == 1.0
    assert y[49, 99] == pytest.approx(1.0)  # 100 is above the 99.9th percentile of nonzero values
    assert y[25, 0] > 0.4  # mid values keep their contrast


def test_normalize_image_shape() -> None:
    img = np.stack([np.arange(400).reshape(20, 20), np.zeros((20, 20))])
    out = normalize_image(img)
    assert out.shape == (2, 20, 20) and (out[1] == 0).all() and out[0].max() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        normalize_image(np.zeros((20, 20)))


def test_channel_rules() -> None:
    nuc, whole = np.full((4, 5), 0.25), np.full((4, 5), 0.75)
    both = to_cellsam_channels(nuc, whole)
    assert both.shape == (3, 4, 5) and both.dtype == np.float32
    assert (both[0] == 0).all() and (both[1] == 0.25).all() and (both[2] == 0.75).all()
    only_nuc = to_cellsam_channels(nuc, None)
    assert (only_nuc[0] == 0).all() and (only_nuc[1] == 0).all() and (only_nuc[2] == 0.25).all()
    only_whole = to_cellsam_channels(None, whole)
    assert (only_whole[1] == 0).all() and (only_whole[2] == 0.75).all()
    with pytest.raises(ValueError):
        to_cellsam_channels(None, None)
    with pytest.raises(ValueError, match="differ in size"):
        to_cellsam_channels(nuc, np.zeros((5, 5)))


def test_rgb_rule() -> None:
    grey = np.zeros((10, 10, 3), np.uint8)
    grey[2:5, 2:5] = 200
    assert np.array_equal(rgb_to_channel(grey), grey[..., 0].astype(np.float32))  # grey: unchanged
    he = np.full((10, 10, 3), 230, np.uint8)  # bright background, purple "nucleus"
    he[2:5, 2:5] = (90, 40, 140)
    ch = rgb_to_channel(he)
    assert ch[3, 3] > ch[8, 8]  # inverted: stained object bright on dark
    fluo = np.zeros((10, 10, 4), np.uint8)  # dark background colour (RGBA) is not inverted
    fluo[2:5, 2:5] = (0, 200, 0, 255)
    assert rgb_to_channel(fluo)[3, 3] > rgb_to_channel(fluo)[8, 8]
    with pytest.raises(ValueError):
        rgb_to_channel(np.zeros((10, 10)))
