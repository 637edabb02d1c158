"""Input handling of cellsam.segment: layouts, dtypes, channel selection and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsam.data.normalize import normalize_channel, rgb_to_channel
from cellsam.inference.preprocess import prepare_image, to_channels_last
from tests.conftest import make_blobs


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    img, _ = make_blobs((40, 48), n=4, radius=(4, 6))
    return img


@pytest.fixture(scope="module")
def ref(grey: np.ndarray) -> np.ndarray:
    return normalize_channel(grey)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
def test_2d_any_dtype_goes_to_blue(grey: np.ndarray, dtype) -> None:
    if np.issubdtype(dtype, np.integer):
        x = (grey * 200).astype(dtype)
    else:
        x = grey.astype(dtype)
    out = prepare_image(x)
    assert out.shape == (3, 40, 48) and out.dtype == np.float32
    assert out[0].max() == 0 and out[1].max() == 0  # R empty, G empty (no nuclear channel given)
    assert 0 <= out.min() and out.max() <= 1 and out[2].max() > 0.9
    np.testing.assert_allclose(out[2], normalize_channel(x), atol=1e-6)


def test_bool_and_torch_inputs(grey: np.ndarray) -> None:
    assert prepare_image(grey > 0.5)[2].max() > 0.9
    np.testing.assert_allclose(prepare_image(torch.from_numpy(grey))[2], normalize_channel(grey), atol=1e-6)


@pytest.mark.parametrize("axis", [0, -1, 2, -3])
def test_channel_axis_chw_and_hwc_give_the_same_result(grey: np.ndarray, ref: np.ndarray, axis: int) -> None:
    nuc = np.roll(grey, 3, axis=1)
    stack = np.stack([nuc, grey, np.zeros_like(grey)], axis=axis)
    out = prepare_image(stack, channel_axis=axis, channels=(0, 1))
    np.testing.assert_allclose(out[1], normalize_channel(nuc), atol=1e-6)  # nuclear -> green
    np.testing.assert_allclose(out[2], ref, atol=1e-6)  # whole-cell -> blue
    assert out[0].max() == 0


def test_nuclear_only_or_wholecell_only_goes_to_blue(grey: np.ndarray, ref: np.ndarray) -> None:
    two = np.stack([grey, np.zeros_like(grey)])
    out = prepare_image(two, channel_axis=0, channels=(0, None))
    np.testing.assert_allclose(out[2], ref, atol=1e-6)
    assert out[1].max() == 0
    out = prepare_image(two[::-1], channel_axis=0, channels=(None, -1))  # negative index allowed
    np.testing.assert_allclose(out[2], ref, atol=1e-6)


def test_single_channel_3d_and_constant_channel(grey: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(prepare_image(grey[None], channel_axis=0)[2], ref, atol=1e-6)
    out = prepare_image(np.stack([np.full_like(grey, 7.0), grey]), channel_axis=0, channels=(0, 1))
    assert np.isfinite(out).all() and out[1].max() == 0  # a constant channel is zeros, not NaN


def test_rgb_and_he() -> None:
    rng = np.random.default_rng(0)
    grey_rgb = np.repeat((rng.random((32, 36)) * 200).astype(np.uint8)[..., None], 3, axis=2)  # median ~100
    out = prepare_image(grey_rgb, channel_axis=-1)
    np.testing.assert_allclose(out[2], normalize_channel(grey_rgb[..., 0]), atol=1e-6)
    light = 255 - grey_rgb  # grey bright-field (median ~155): inverted
    np.testing.assert_allclose(prepare_image(light, channel_axis=-1)[2],
                               normalize_channel(255 - light[..., 0].astype(np.float32)), atol=1e-6)
    he = np.full((32, 36, 3), (230, 200, 220), np.uint8)  # bright pink background
    he[8:20, 8:20] = (80, 40, 120)  # dark purple nucleus
    out = prepare_image(he, channel_axis=2)
    np.testing.assert_allclose(out[2], normalize_channel(rgb_to_channel(he)), atol=1e-6)
    assert out[2][10, 10] > out[2][0, 0]  # inverted: stained nucleus bright on dark
    rgba = np.concatenate([he, np.full((32, 36, 1), 255, np.uint8)], axis=2)
    np.testing.assert_allclose(prepare_image(rgba, channel_axis=-1), out, atol=1e-6)


def test_normalize_false_passes_a_prepared_image_through(grey: np.ndarray) -> None:
    img = np.stack([np.zeros_like(grey), grey, grey]).astype(np.float32)
    np.testing.assert_array_equal(prepare_image(img, channel_axis=0, normalize=False), img)
    with pytest.raises(ValueError, match="normalize=False"):
        prepare_image(grey, normalize=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prepare_image(img * 3, channel_axis=0, normalize=False)


@pytest.mark.parametrize(
    ("x", "kw", "match"),
    [
        (np.zeros((2, 3, 40, 40, 1)), {}, "5-D"),
        (np.zeros((4, 40, 40, 3)), {}, "4-D"),
        (np.zeros((1, 1)), {}, "too small"),
        (np.zeros((1, 1, 3)), {"channel_axis": -1}, "too small"),
        (np.zeros(40), {}, "1-D"),
        (np.full((40, 40), np.nan), {}, "NaN"),
        (np.full((40, 40), np.inf), {}, "NaN or infinite"),
        (np.zeros((40, 40, 3)), {}, "channel_axis=0 for"),
        (np.zeros((40, 40)), {"channel_axis": 0}, "2-D"),
        (np.zeros((3, 40, 40)), {"channel_axis": 3}, "channel_axis must be"),
        (np.zeros((3, 40, 40)), {"channel_axis": 0, "channels": (0, 3)}, "whole-cell channel index 3 is out of range"),
        (np.zeros((3, 40, 40)), {"channel_axis": 0, "channels": (-4, 1)}, "nuclear channel index -4 is out of range"),
        (np.zeros((3, 40, 40)), {"channel_axis": 0, "channels": (None, None)}, "at least one"),
        (np.zeros((3, 40, 40)), {"channel_axis": 0, "channels": (0,)}, "nuclear_idx, wholecell_idx"),
        (np.zeros((3, 40, 40)), {"channel_axis": 0, "channels": (0.5, 1)}, "integer or None"),
        (np.zeros((2, 40, 40)), {"channel_axis": 0}, "2 channels needs channels="),
        (np.zeros((5, 40, 40)), {"channel_axis": 0}, "5 channels needs channels="),
    ],
)
def test_bad_inputs_raise_clear_value_errors(x: np.ndarray, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prepare_image(x, **kw)


def test_bad_types_raise_type_errors() -> None:
    with pytest.raises(TypeError, match="numeric"):
        prepare_image(np.array([["a"] * 8] * 8))
    with pytest.raises(TypeError, match="complex"):
        prepare_image(np.zeros((8, 8), complex))
    with pytest.raises(TypeError, match="image array"):
        prepare_image("image.png")


def test_to_channels_last_moves_the_axis() -> None:
    x = np.arange(2 * 5 * 6).reshape(2, 5, 6)
    out = to_channels_last(x, channel_axis=0)
    assert out.shape == (5, 6, 2) and out[1, 2, 1] == x[1, 1, 2]
