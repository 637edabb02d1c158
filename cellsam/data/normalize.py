"""Intensity normalisation and the CellSAM channel convention (paper Appendix A).

Used both by ``cellsam prepare`` and at inference, so that a user's image is standardised
exactly as the training tiles were.

Channel convention: a standardised image is ``(3, H, W)`` float32 in [0, 1] with
R (index 0) always empty, G (index 1) the nuclear channel, B (index 2) the whole-cell
channel. An image with only ONE channel (nuclear-only, phase only, bright-field, H&E)
puts that channel in BLUE and leaves green empty, as the reference places a C-channel input
in the last C slots. Only when both a nuclear and a whole-cell channel exist is green used.

RGB rule (:func:`rgb_to_channel`): an RGB(A) image becomes ONE grey channel.
- Grey stored as RGB (R = G = B): that channel; inverted when its median is above half the range (a
  bright-field picture, objects dark on a light background). On ``../shared/data`` the 513 grey DSB images
  split cleanly: 499 fluorescence images with medians at most 0.17 of the range (objects brighter) and 14
  bright-field ones at 0.88-0.91 (objects darker). A single-channel image is never inverted (phase
  contrast, also on a mid-grey background, is learnt as it is).
- Colour: luminance ``0.299 R + 0.587 G + 0.114 B``. A stained bright-field picture (H&E, IHC,
  other stains; :func:`is_stained_brightfield`) is inverted (``max - lum``), so that stained
  objects are bright on dark as in fluorescence; a colour fluorescence composite is not. The
  test is by colour, not by brightness: in bright-field the brightest pixels are the unstained
  glass or tissue, nearly neutral grey; in a fluorescence composite they are the coloured signal.
  (A brightness test, "median above half the range", left 4 of MoNuSeg's 13 dense H&E images
  and 3 of DSB's 96 stained ones dark-on-bright, so H&E reached the model in both polarities.)
  With ``stain="hematoxylin"`` a stained picture becomes its hematoxylin optical density instead
  (:func:`hematoxylin`: colour deconvolution, the nuclear stain without the eosin of cytoplasm and
  stroma). Which of the two a model takes is its ``inference.stain_grey``: how its data were prepared.
- Alpha is ignored.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

CLAHE_KERNEL = 128
CLIP_PERCENTILE = 99.9
_LUMA = np.array([0.299, 0.587, 0.114])
StainGrey = Literal["luminance", "hematoxylin"]  # the grey of a stained bright-field picture
STAIN_GREYS: tuple[StainGrey, ...] = get_args(StainGrey)


def check_stain_grey(value: object, name: str = "stain_grey") -> StainGrey:
    """``value`` as a :data:`StainGrey`; ``ValueError`` naming ``name`` for anything else."""
    if value not in STAIN_GREYS:
        raise ValueError(f"{name} must be {' or '.join(map(repr, STAIN_GREYS))}, got {value!r}")
    return value


def _check_2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a (H, W) array, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name}: empty array of shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise TypeError(f"{name}: expected a numeric array, got dtype {x.dtype}")
    if np.iscomplexobj(x):
        raise TypeError(f"{name}: complex images are not supported")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def normalize_channel(x: np.ndarray, *, clahe: bool = True) -> np.ndarray:
    """Normalise one channel as the reference CellSAM does.

    Clip at the 99.9th percentile of the nonzero values, rescale min..max to [0, 1], then
    CLAHE (``skimage.exposure.equalize_adapthist``, kernel 128, default clip 0.01).

    Args:
        x: (H, W) numeric array (any dtype); NaN/inf raise ``ValueError``.
        clahe: apply CLAHE after rescaling (default True, as in training).
    Returns:
        (H, W) float32 in [0, 1]. A constant or all-zero channel gives zeros (never NaN).
    """
    x = _check_2d(x, "normalize_channel").astype(np.float64)
    nonzero = x[x != 0]
    if nonzero.size == 0:
        return np.zeros(x.shape, np.float32)
    hi = np.percentile(nonzero, CLIP_PERCENTILE)
    x = np.minimum(x, hi)
    lo, hi = float(x.min()), float(x.max())
    if hi - lo <= 0:
        return np.zeros(x.shape, np.float32)
    x = (x - lo) / (hi - lo)
    if clahe:
        from skimage.exposure import equalize_adapthist

        x = equalize_adapthist(x, kernel_size=CLAHE_KERNEL)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def normalize_image(img: np.ndarray, *, clahe: bool = True) -> np.ndarray:
    """Apply :func:`normalize_channel` to each channel.

    Args:
        img: (C, H, W) numeric array.
    Returns:
        (C, H, W) float32 in [0, 1].
    """
    img = np.asarray(img)
    if img.ndim != 3:
        raise ValueError(f"normalize_image: expected a (C, H, W) array, got shape {img.shape}")
    return np.stack([normalize_channel(c, clahe=clahe) for c in img]).astype(np.float32)


def to_cellsam_channels(nuclear: np.ndarray | None, wholecell: np.ndarray | None) -> np.ndarray:
    """Place channels in CellSAM's (R empty, G nuclear, B whole-cell) layout.

    - both given: G = nuclear, B = whole-cell;
    - only one given (nuclear OR whole-cell): it goes to BLUE, green stays empty
      (the reference's rule: nuclear-only data sets move nuclear to blue);
    - none: ``ValueError``.

    Args:
        nuclear, wholecell: (H, W) arrays (normally already normalised) or None.
    Returns:
        (3, H, W) float32; values are copied, not rescaled.
    """
    chans = [c for c in (nuclear, wholecell) if c is not None]
    if not chans:
        raise ValueError("to_cellsam_channels: at least one of nuclear / wholecell is required")
    for c in chans:
        _check_2d(c, "to_cellsam_channels")
    if nuclear is not None and wholecell is not None and np.shape(nuclear) != np.shape(wholecell):
        raise ValueError(
            f"to_cellsam_channels: nuclear {np.shape(nuclear)} and whole-cell {np.shape(wholecell)} "
            "differ in size"
        )
    h, w = np.shape(chans[0])
    out = np.zeros((3, h, w), np.float32)
    if len(chans) == 2:
        out[1] = nuclear
        out[2] = wholecell
    else:
        out[2] = chans[0]
    return out


def is_grey_rgb(rgb: np.ndarray) -> bool:
    """True when an (H, W, 3|4) image has R = G = B everywhere."""
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]))


BRIGHT_FRACTION = 0.05  # the brightest 5% of pixels are where bright-field shows its background
NEUTRAL_TINT = 0.6  # their chroma / luminance: shared data's bright-field <= 0.30, composites >= 1.15
DARK_MEDIAN = 0.2  # a median luminance below 20% of the range is a dark (fluorescence) background
BRIGHT_GREY_MEDIAN = 0.5  # a grey RGB picture with its median above half the range is bright-field


def is_stained_brightfield(rgb: np.ndarray) -> bool:
    """True when a colour (H, W, 3) image is a stained bright-field picture (objects dark on light).

    Its brightest :data:`BRIGHT_FRACTION` of pixels must be nearly neutral (mean chroma
    ``max(R,G,B) - min(R,G,B)`` below :data:`NEUTRAL_TINT` times their mean luminance) and its
    median luminance above :data:`DARK_MEDIAN` of the value range. On ``../shared/data`` this
    holds for all 109 colour images (all are stained bright-field, in each the labelled objects are
    darker than the rest) and fails for every two-channel composite made from DSB's fluorescence
    images; a dense H&E tile whose median luminance is below half the range still passes.
    """
    rgb = np.asarray(rgb)[..., :3]
    lum = _luminance(rgb)
    return _stained(rgb, lum, _range_top(rgb, lum))


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) float32 luminance in the input's value scale."""
    return (rgb.astype(np.float64) @ _LUMA).astype(np.float32)


def _range_top(rgb: np.ndarray, lum: np.ndarray) -> float:
    """The top of the value range: the dtype's maximum for integers, else the brightest value (>= 1)."""
    return float(np.iinfo(rgb.dtype).max) if np.issubdtype(rgb.dtype, np.integer) else max(float(lum.max()), 1.0)


def _stained(rgb: np.ndarray, lum: np.ndarray, top: float) -> bool:
    """:func:`is_stained_brightfield` on an image whose luminance and range top are already known."""
    bright = lum >= np.quantile(lum, 1.0 - BRIGHT_FRACTION)
    px = rgb[bright].astype(np.float64)  # (K, 3): only the brightest pixels
    chroma = float((px.max(-1) - px.min(-1)).mean())
    neutral = chroma < NEUTRAL_TINT * max(float(lum[bright].mean()), 1e-6)
    return bool(neutral and float(np.median(lum)) > DARK_MEDIAN * top)


def _grey_of(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """The validated (H, W, 3) colour part of an RGB(A) array, its grey (the red channel of a grey
    picture, else the luminance) and whether it is a grey picture."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        raise ValueError(f"rgb_to_channel: expected (H, W, 3) or (H, W, 4), got shape {rgb.shape}")
    rgb = rgb[..., :3]
    if np.issubdtype(rgb.dtype, np.floating) and not np.isfinite(rgb).all():
        raise ValueError("rgb_to_channel: contains NaN or infinite values")
    grey = is_grey_rgb(rgb)
    return rgb, (rgb[..., 0].astype(np.float32) if grey else _luminance(rgb)), grey


def rgb_range_top(rgb: np.ndarray) -> float:
    """The value an inverted RGB(A) image's grey is subtracted from (see :func:`rgb_to_channel`): the
    dtype's maximum for integers, else the brightest grey value (at least 1). Measure it once on the
    whole image (or a sample of it) to convert the image window by window."""
    rgb, lum, _ = _grey_of(rgb)
    return _range_top(rgb, lum)


def hematoxylin(rgb: np.ndarray, top: float) -> np.ndarray:
    """(H, W, 3) colour picture -> (H, W) float32 hematoxylin optical density (bright where nuclei are
    stained), by Ruifrok and Johnston's colour deconvolution (``skimage.color.rgb2hed``) of ``rgb / top``."""
    from skimage.color import rgb2hed

    x = np.clip(rgb.astype(np.float64) / max(top, 1e-12), 0.0, 1.0)
    return rgb2hed(x)[..., 0].astype(np.float32)


def rgb_to_channel(rgb: np.ndarray, *, invert: bool | Literal["auto"] = "auto",
                   top: float | None = None, stain: StainGrey = "luminance") -> np.ndarray:
    """One grey channel from an RGB(A) image, by the module's documented RGB rule.

    Args:
        rgb: (H, W, 3) or (H, W, 4) numeric array, channels last (alpha ignored).
        invert: ``"auto"`` inverts stained bright-field colour images (H&E;
            :func:`is_stained_brightfield`) and grey ones on a light background (median above
            :data:`BRIGHT_GREY_MEDIAN` of the range); True/False force it.
        top: the top of the value range (:func:`rgb_range_top`); default: this array's. A window of a
            larger float image needs the whole image's, or windows are inverted by different amounts.
        stain: the grey of an inverted colour picture: ``"luminance"`` (``top - lum``) or
            ``"hematoxylin"`` (:func:`hematoxylin`, the nuclear stain alone). Grey pictures are unaffected.
    Returns:
        (H, W) float32 in the input's value scale (not normalised).
    """
    rgb, lum, grey = _grey_of(rgb)
    top = _range_top(rgb, lum) if top is None else float(top)
    do_invert = _inverts(rgb, lum, grey, top) if invert == "auto" else bool(invert)
    if do_invert and stain == "hematoxylin" and not grey:
        return hematoxylin(rgb, top)
    if do_invert:
        lum = (top - lum).astype(np.float32)
    return lum


def rgb_inverts(rgb: np.ndarray, *, top: float | None = None) -> bool:
    """Whether :func:`rgb_to_channel` with ``invert="auto"`` inverts this RGB(A) image (``top`` as there)."""
    rgb, lum, grey = _grey_of(rgb)
    return _inverts(rgb, lum, grey, _range_top(rgb, lum) if top is None else float(top))


def _inverts(rgb: np.ndarray, lum: np.ndarray, grey: bool, top: float) -> bool:
    """The RGB rule's decision: a grey picture on a light background, or a stained bright-field one."""
    return float(np.median(lum)) > BRIGHT_GREY_MEDIAN * top if grey else _stained(rgb, lum, top)
