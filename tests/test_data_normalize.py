"""Normalisation and channel rules (cellsam.data.normalize)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellsam.data.normalize import (
    is_grey_rgb,
    is_stained_brightfield,
    normalize_channel,
    normalize_image,
    rgb_inverts,
    rgb_range_top,
    rgb_to_channel,
    to_cellsam_channels,
)


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
    assert np.array_equal(rgb_to_channel(grey), grey[..., 0].astype(np.float32))  # grey fluorescence: unchanged
    brightfield = np.full((10, 10, 3), 225, np.uint8)  # grey bright-field: dark object on light glass
    brightfield[2:5, 2:5] = 60
    assert np.array_equal(rgb_to_channel(brightfield), 255 - brightfield[..., 0].astype(np.float32))
    assert np.array_equal(rgb_to_channel(brightfield, invert=False), brightfield[..., 0].astype(np.float32))
    he = np.full((10, 10, 3), 230, np.uint8)  # bright background, purple "nucleus"
    he[2:5, 2:5] = (90, 40, 140)
    ch = rgb_to_channel(he)
    assert ch[3, 3] > ch[8, 8]  # inverted: stained object bright on dark
    fluo = np.zeros((10, 10, 4), np.uint8)  # dark background colour (RGBA) is not inverted
    fluo[2:5, 2:5] = (0, 200, 0, 255)
    assert rgb_to_channel(fluo)[3, 3] > rgb_to_channel(fluo)[8, 8]
    with pytest.raises(ValueError):
        rgb_to_channel(np.zeros((10, 10)))
    # rgb_inverts is the decision rgb_to_channel takes: inverted exactly for the bright-field pictures
    assert [rgb_inverts(x) for x in (grey, brightfield, he, fluo)] == [False, True, True, False]
    for x in (grey, brightfield, he, fluo):
        top = rgb_range_top(x)
        assert np.array_equal(rgb_to_channel(x), rgb_to_channel(x, invert=rgb_inverts(x, top=top), top=top))


def test_rgb_rule_decides_polarity_by_colour_not_brightness() -> None:
    # A dense H&E tile: mostly purple nuclei and pink stroma, little white; median luminance is
    # below half the range, which the old brightness rule left dark-on-bright.
    dense = np.empty((20, 20, 3), np.uint8)
    dense[:12] = (90, 40, 140)
    dense[12:19] = (200, 120, 170)
    dense[19] = (236, 234, 238)
    assert np.median(dense.astype(float) @ np.array([0.299, 0.587, 0.114])) < 127
    assert is_stained_brightfield(dense)
    ch = rgb_to_channel(dense)
    assert ch[3, 3] > ch[15, 3] > ch[19, 3]  # nuclei brightest, glass darkest
    # Two-colour fluorescence on an autofluorescent (not black) background stays as it is,
    # even where the background is brighter than half the signal.
    comp = np.full((20, 20, 3), 60, np.uint8)
    comp[2:6, 2:6] = (40, 230, 40)  # green nuclei
    comp[10:14, 10:14] = (220, 40, 220)  # magenta cytoplasm
    assert not is_stained_brightfield(comp)
    assert rgb_to_channel(comp)[3, 3] > rgb_to_channel(comp)[18, 18]
    # A dark-backgrounded image with near-white signal is fluorescence too.
    white_signal = np.zeros((20, 20, 3), np.uint8)
    white_signal[2:8, 2:8] = (250, 245, 240)
    assert not is_stained_brightfield(white_signal)


def test_rgb_rule_on_shared_stained_images(shared_data: Path) -> None:
    """Every RGB image in ../shared/data (colour bright-field, grey bright-field and grey fluorescence)
    must come out of the rule with its labelled objects brighter than the rest."""
    from skimage.io import imread

    paths = sorted((shared_data / "monuseg").glob("*_img.png"))
    paths += sorted((shared_data / "dsb2018").glob("*_img.png"))
    colour = grey_brightfield = 0
    for path in paths:
        rgb = imread(path)[..., :3]
        ch = rgb_to_channel(rgb)
        labels = imread(str(path).replace("_img.png", "_masks.png"))
        assert ch[labels > 0].mean() > ch[labels == 0].mean(), path.name
        if not is_grey_rgb(rgb):
            colour += 1
        elif np.median(rgb[..., 0]) > 127:
            grey_brightfield += 1
    assert colour >= 13 and grey_brightfield >= 10
