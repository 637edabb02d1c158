"""Validate a user's image and turn it into CellSAM's normalised (3, H, W) layout.

Rules (nothing is guessed from the shape):

- a 2-D array (H, W) is one channel;
- a 3-D array needs ``channel_axis`` (0 for (C, H, W), -1 / 2 for (H, W, C)); without it a
  ``ValueError`` says what to pass;
- ``channels=(nuclear_idx, wholecell_idx)`` picks channels along that axis; either may be ``None``.
  Only a nuclear channel, or only a whole-cell channel, goes to blue (the paper's convention);
- without ``channels``: 1 channel goes to blue; 3 or 4 channels are an RGB(A) picture (bright-field,
  H&E, or grey stored as RGB) turned into one grey channel by
  :func:`cellsam.data.normalize.rgb_to_channel`; any other count needs ``channels``;
- every channel is normalised by :func:`cellsam.data.normalize.normalize_channel` (99.9th-percentile
  clip + CLAHE, kernel 128; a constant channel becomes zeros).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cellsam.data.normalize import StainGrey, normalize_channel, rgb_to_channel, to_cellsam_channels

MIN_SIDE = 4
Channels = tuple[int | None, int | None]


def as_numpy(image: Any) -> np.ndarray:
    """A numpy view of an array-like (numpy, torch tensor, anything with ``__array__``)."""
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch.Tensor without importing torch
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        if not hasattr(image, "__array__"):
            raise TypeError(f"expected an image array (numpy / torch), got {type(image).__name__}")
        image = np.asarray(image)
    return image


def _check_dtype(x: np.ndarray) -> np.ndarray:
    if x.dtype == bool:
        return x.astype(np.uint8)
    if np.iscomplexobj(x):
        raise TypeError("complex images are not supported")
    if not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"expected a numeric image, got dtype {x.dtype}")
    check_finite(x)
    return x


def check_finite(x: np.ndarray) -> None:
    """``ValueError`` when a floating-point image (or a window or sample of one) holds NaN or inf values."""
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError("the image contains NaN or infinite values; replace them (e.g. np.nan_to_num) first")


def to_channels_last(image: Any, *, channel_axis: int | None = None) -> np.ndarray:
    """Validate shape and dtype; return (H, W, C) with C >= 1.

    Args:
        image: (H, W), or 3-D with the channel axis given by ``channel_axis``.
    Raises:
        ValueError: wrong number of dimensions, missing/invalid ``channel_axis``, an image smaller than
            ``MIN_SIDE`` pixels, NaN/inf values. TypeError: non-numeric data.
    """
    x = as_numpy(image)
    if x.ndim == 2:
        if channel_axis is not None:
            raise ValueError(
                f"channel_axis={channel_axis} given for a 2-D (H, W) image of shape {x.shape}; "
                "leave it out (None) for a single-channel image"
            )
        x = x[..., None]
    elif x.ndim == 3:
        if channel_axis is None:
            raise ValueError(
                f"got a 3-D image of shape {x.shape}: say where its channels are with channel_axis=0 for "
                "(C, H, W) or channel_axis=-1 for (H, W, C), e.g. RGB images read by PIL / skimage"
            )
        if not isinstance(channel_axis, (int, np.integer)) or not -3 <= channel_axis <= 2:
            raise ValueError(
                f"channel_axis must be an integer in [-3, 2] for a 3-D image, got {channel_axis!r}"
            )
        x = np.moveaxis(x, int(channel_axis), -1)
    else:
        raise ValueError(
            f"expected a 2-D (H, W) or 3-D image with a channel axis, got a {x.ndim}-D array of shape "
            f"{x.shape}; for several images pass a list (or batch=True for an array whose first axis is "
            "the image index); "
            "z-stacks and time series must be split into 2-D images first"
        )
    if x.shape[0] < MIN_SIDE or x.shape[1] < MIN_SIDE:
        raise ValueError(
            f"image of size {x.shape[0]}x{x.shape[1]} is too small (at least {MIN_SIDE}x{MIN_SIDE})"
        )
    if x.shape[2] == 0:
        raise ValueError(f"image has no channels (shape {x.shape} after moving the channel axis last)")
    return _check_dtype(x)


def check_channels(channels: Any, n_channels: int) -> Channels:
    if not isinstance(channels, (tuple, list)) or len(channels) != 2:
        raise ValueError(
            f"channels must be (nuclear_idx, wholecell_idx) with None for a missing one, got {channels!r}"
        )
    out: list[int | None] = []
    for name, c in zip(("nuclear", "whole-cell"), channels, strict=True):
        if c is None:
            out.append(None)
            continue
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise ValueError(f"{name} channel index must be an integer or None, got {c!r}")
        if not -n_channels <= c < n_channels:
            raise ValueError(
                f"{name} channel index {c} is out of range for an image with {n_channels} channel(s)"
            )
        out.append(int(c) % n_channels)
    if out[0] is None and out[1] is None:
        raise ValueError(
            "channels=(None, None): give at least one of the nuclear / whole-cell channel indices"
        )
    return out[0], out[1]


def stain_grey(model: object) -> StainGrey:
    """How ``model`` wants stained bright-field colour pictures as grey (its ``cfg.inference.stain_grey``;
    ``"luminance"`` for a model without a config)."""
    from cellsam.models.protocol import inference_defaults

    return inference_defaults(model).stain_grey


def prepare_image(
    image: Any,
    *,
    channel_axis: int | None = None,
    channels: Channels | None = None,
    normalize: bool = True,
    stain: StainGrey = "luminance",
) -> np.ndarray:
    """A user's image as CellSAM's input: (3, H, W) float32 in [0, 1], R empty, G nuclear, B whole-cell.

    Args:
        image: (H, W), or (C, H, W) / (H, W, C) with ``channel_axis``; uint8, uint16, any int, float or bool.
        channel_axis: axis of the channels of a 3-D image (required for 3-D, forbidden for 2-D).
        channels: ``(nuclear_idx, wholecell_idx)``, either may be None; see the module docstring.
        normalize: False when ``image`` is already a normalised CellSAM image (3 channels in the R-empty,
            G-nuclear, B-whole-cell order, values in [0, 1]); it is then only validated.
        stain: how a stained bright-field colour picture becomes grey (``rgb_to_channel``'s ``stain``); pass
            the model's :func:`stain_grey` so that the image is prepared as its training data were.
    Returns:
        (3, H, W) float32 in [0, 1].
    """
    x = to_channels_last(image, channel_axis=channel_axis)
    c = x.shape[2]
    if not normalize:
        if channels is not None or c != 3:
            raise ValueError(
                f"normalize=False expects an already normalised 3-channel CellSAM image (R empty, G nuclear, "
                f"B whole-cell) and no channels=; got {c} channel(s), channels={channels!r}"
            )
        x = x.astype(np.float32)
        if x.size and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError("normalize=False expects values in [0, 1]")
        return np.ascontiguousarray(np.moveaxis(x, -1, 0))
    if channels is not None:
        nuc_i, wc_i = check_channels(channels, c)
        nuc = None if nuc_i is None else normalize_channel(x[..., nuc_i])
        wc = None if wc_i is None else normalize_channel(x[..., wc_i])
        return to_cellsam_channels(nuc, wc)
    if c == 1:
        return to_cellsam_channels(None, normalize_channel(x[..., 0]))
    if c in (3, 4):
        return to_cellsam_channels(None, normalize_channel(rgb_to_channel(x, stain=stain)))
    raise ValueError(
        f"an image with {c} channels needs channels=(nuclear_idx, wholecell_idx) (None for a missing one); "
        "only 1-channel and RGB(A) images are understood without it"
    )
