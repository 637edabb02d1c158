"""Lazily read large images window by window, and normalise windows with image-global statistics.

Sources (:func:`open_source`): an OME-Zarr / Zarr folder, a TIFF (only the strips / tiles a window
touches are decoded, :mod:`.tiff`), a ``.npy`` (memory-mapped), or an in-memory array
(numpy, zarr). Only a window is ever read (:meth:`ImageSource.read`). Axes follow :mod:`cellsam.io`:
singleton T/Z/C axes are dropped, a real z-stack or time series is refused, a 3-D array without axes
metadata needs ``channel_axis``.

Normalisation (:class:`Normalizer`). The single-process path normalises each channel over the whole
image (99.9th percentile of the nonzero values, min..max rescale, CLAHE with kernel 128). Block-wise:

- the percentile and the minimum come from a strided sample of the whole image (at most about
  ``SAMPLE_PIXELS`` pixels, read in parallel on the workers), and the RGB inversion decision from the
  same sample; the rescale is then applied to each window with these global numbers;
- CLAHE is local: it runs on each window grown by a ``CLAHE_KERNEL`` (128 px) halo, and the halo is
  cut off. Values therefore differ slightly from the single-process path near nothing but CLAHE's
  per-window contrast stretch; results are equal when both paths get the same normalised input
  (``normalize=False``), which is how the equality test compares them.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.data.normalize import (
    CLAHE_KERNEL,
    CLIP_PERCENTILE,
    StainGrey,
    rgb_inverts,
    rgb_range_top,
    rgb_to_channel,
)
from cellsam.inference.preprocess import check_finite

SAMPLE_PIXELS = 4_000_000
Rect = tuple[int, int, int, int]  # (y0, x0, y1, x1), exclusive ends


@functools.lru_cache(maxsize=8)
def _open_path(path: str) -> tuple[Any, str | None]:
    """(array-like, axes letters or None) of a file; cached per process (one open per worker)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return np.load(p, mmap_mode="r", allow_pickle=False), None
    if suffix in (".tif", ".tiff"):
        from cellsam.distributed.tiff import TiffArray

        arr = TiffArray(str(p))
        return arr, arr.axes
    if suffix == ".zarr":
        import zarr

        node = zarr.open(str(p), mode="r")
        attrs = dict(getattr(node, "attrs", {}))
        if "multiscales" in attrs:
            ms = attrs["multiscales"][0]
            axes = "".join((a["name"] if isinstance(a, dict) else a)[0] for a in ms.get("axes", []))
            return node[ms["datasets"][0]["path"]], axes or None
        if hasattr(node, "shape"):
            return node, None
        raise ValueError(f"{p}: a zarr group without OME 'multiscales' metadata")
    raise ValueError(f"{p}: lazy reading supports .zarr, .tif/.tiff and .npy, not {suffix!r}")


@dataclass
class ImageSource:
    """A 2-D image (with channels) read window by window.

    Attributes:
        path: file the array comes from (opened lazily on each worker), or None for ``array``.
        array: the array-like when no path is given (numpy / zarr; sent to the workers).
        template: per stored axis ``"Y"``, ``"X"``, ``"C"`` or ``0`` (a dropped singleton axis).
        shape: (H, W); n_channels: C (1 for a 2-D image).
    """

    path: str | None
    array: Any
    template: tuple[str | int, ...]
    shape: tuple[int, int]
    n_channels: int

    def _arr(self) -> Any:
        return self.array if self.path is None else _open_path(self.path)[0]

    def read(self, rect: Rect, step: int = 1) -> np.ndarray:
        """The window ``rect`` (every ``step``-th pixel) as (h, w, C), in the stored dtype."""
        y0, x0, y1, x1 = rect
        idx = tuple(
            slice(y0, y1, step)
            if a == "Y"
            else slice(x0, x1, step)
            if a == "X"
            else slice(None)
            if a == "C"
            else 0
            for a in self.template
        )
        data = np.asarray(self._arr()[idx])
        kept = [a for a in self.template if a != 0]
        order = [kept.index("Y"), kept.index("X")] + ([kept.index("C")] if "C" in kept else [])
        data = np.transpose(data, order)
        return data if data.ndim == 3 else data[..., None]


def open_source(image: Any, *, channel_axis: int | None = None) -> ImageSource:
    """An :class:`ImageSource` for a path (``.zarr``, ``.tif``, ``.npy``) or an array-like.

    Args:
        image: path, or an array (H, W) / 3-D with ``channel_axis``.
        channel_axis: channel axis of a 3-D image after dropping singleton axes; overrides file metadata.
    Raises:
        ValueError: unsupported layout (z-stack, time series, 3-D without a channel axis), tiny image.
        TypeError: not a path nor an array-like.
    """
    path = None
    if isinstance(image, (str, os.PathLike)):
        path = str(image)
        if not Path(path).exists():
            raise ValueError(f"{path}: no such file")
        arr, axes = _open_path(path)
    else:
        if not (hasattr(image, "shape") and hasattr(image, "__getitem__") and hasattr(image, "dtype")):
            raise TypeError(f"expected an image path or array, got {type(image).__name__}")
        arr, axes = image, None
    shape = tuple(int(s) for s in arr.shape)
    if not np.issubdtype(np.dtype(arr.dtype), np.number) and np.dtype(arr.dtype) != bool:
        raise TypeError(f"expected a numeric image, got dtype {arr.dtype}")
    if channel_axis is not None and (
        isinstance(channel_axis, bool)
        or not isinstance(channel_axis, (int, np.integer))
        or not -3 <= channel_axis <= 2
    ):
        raise ValueError(f"channel_axis must be an integer in [-3, 2], got {channel_axis!r}")
    if axes is None or len(axes) != len(shape):
        if len(shape) == 3:
            if channel_axis is None:
                raise ValueError(
                    f"got a 3-D image of shape {shape}: say where its channels are with channel_axis=0 for "
                    "(C, H, W) or channel_axis=-1 for (H, W, C)"
                )
            ca = int(channel_axis) % 3
            spatial = [i for i in range(3) if i != ca]
            axes = "".join("C" if i == ca else "Y" if i == spatial[0] else "X" for i in range(3))
            channel_axis = None  # used up
        elif len(shape) == 2:
            axes = "YX"
        else:
            raise ValueError(f"expected a 2-D or 3-D image (with channels), got shape {shape}")
    axes = axes.upper()
    kept = [i for i, a in enumerate(axes) if a in "YX" or shape[i] > 1]
    if channel_axis is not None:  # the user's say on a file's (squeezed) axes
        if len(kept) != 3 or axes[kept[int(channel_axis) % 3]] in "YX":
            raise ValueError(
                f"channel_axis={channel_axis} does not name a non-spatial axis of axes "
                f"{''.join(axes[i] for i in kept)} (shape {[shape[i] for i in kept]})"
            )
        i = kept[int(channel_axis) % 3]
        axes = axes[:i] + "C" + axes[i + 1 :]
    sq = "".join(axes[i] for i in kept)
    extra = [a for a in sq if a not in "YX"]
    if "Y" not in sq or "X" not in sq or len(extra) > 1 or (extra and extra[0] not in "CS"):
        hint = " (give channel_axis)" if extra and extra[0] in "QI" else ": split z-stacks / time series"
        raise ValueError(
            f"image with axes {sq} and shape {[shape[i] for i in kept]} is not 2-D (+ channels){hint}"
        )
    template = tuple(("C" if axes[i] in "CSQI" else axes[i]) if i in kept else 0 for i in range(len(shape)))
    h, w = shape[template.index("Y")], shape[template.index("X")]
    if h < 4 or w < 4:
        raise ValueError(f"image of size {h}x{w} is too small (at least 4x4)")
    n_c = shape[template.index("C")] if "C" in template else 1
    return ImageSource(path, None if path else arr, template, (h, w), n_c)


# ------------------------------------------------------------------------------------ normalisation
@dataclass(frozen=True)
class Normalizer:
    """Maps a raw (h, w, C) window to CellSAM's (3, h, w) float32 in [0, 1].

    Attributes:
        prepared: the input already is CellSAM's 3-channel [0, 1] layout (only validated).
        picks: for (green = nuclear, blue = whole-cell): a channel index, -1 for the grey of an RGB(A)
            picture, or None (empty channel).
        invert: invert the RGB grey (bright-field background), decided on the global sample.
        top: the RGB grey's range top measured on the global sample (what inversion subtracts from, the
            same in every window); None: each window's own (integer images: the dtype's maximum anyway).
        lo, hi: per pick, the global rescale range after the percentile clip (hi <= lo: all zeros).
        clahe: apply CLAHE per window.
        stain: how an inverted colour picture's grey is made (the model's ``inference.stain_grey``).
    """

    prepared: bool
    picks: tuple[int | None, int | None] = (None, None)
    invert: bool = False
    top: float | None = None
    lo: tuple[float, float] = (0.0, 0.0)
    hi: tuple[float, float] = (0.0, 0.0)
    clahe: bool = True
    stain: StainGrey = "luminance"

    def _raw(self, window: np.ndarray, pick: int) -> np.ndarray:
        if pick == -1:
            return rgb_to_channel(window, invert=self.invert, top=self.top, stain=self.stain).astype(np.float64)
        return window[..., pick].astype(np.float64)

    def apply(self, window: np.ndarray) -> np.ndarray:
        """(h, w, C) raw window -> (3, h, w) float32 in [0, 1] (CLAHE over the whole window).

        Raises ``ValueError`` for NaN or infinite values (as :func:`cellsam.segment` does for an image in
        memory): a block of them would otherwise come out empty and look like a region without cells."""
        check_finite(window)
        if self.prepared:
            x = window.astype(np.float32)
            if x.size and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
                raise ValueError("normalize=False expects values in [0, 1]")
            return np.ascontiguousarray(np.moveaxis(x, -1, 0))
        out = np.zeros((3, *window.shape[:2]), np.float32)
        for slot, pick, lo, hi in zip((1, 2), self.picks, self.lo, self.hi, strict=True):
            if pick is None or hi <= lo:
                continue
            x = np.clip((np.minimum(self._raw(window, pick), hi) - lo) / (hi - lo), 0.0, 1.0)
            if self.clahe and float(x.max()) > float(x.min()):
                from skimage.exposure import equalize_adapthist

                x = equalize_adapthist(x, kernel_size=CLAHE_KERNEL)
            out[slot] = np.clip(x, 0.0, 1.0)
        return out


def channel_picks(
    n_channels: int, channels: tuple[int | None, int | None] | None
) -> tuple[int | None, int | None]:
    """(green, blue) picks by :func:`cellsam.inference.preprocess.prepare_image`'s channel rules."""
    if channels is not None:
        from cellsam.inference.preprocess import check_channels

        nuc, wc = check_channels(channels, n_channels)
        return (nuc, wc) if nuc is not None and wc is not None else (None, nuc if wc is None else wc)
    if n_channels == 1:
        return None, 0
    if n_channels in (3, 4):
        return None, -1
    raise ValueError(
        f"an image with {n_channels} channels needs channels=(nuclear_idx, wholecell_idx) "
        "(None for a missing one)"
    )


def sample_step(shape: tuple[int, int], max_pixels: int = SAMPLE_PIXELS) -> int:
    """Stride of the global statistics sample: at most about ``max_pixels`` pixels."""
    return max(1, math.ceil(math.sqrt(shape[0] * shape[1] / max_pixels)))


def fit_normalizer(
    samples: list[np.ndarray],
    n_channels: int,
    *,
    channels: tuple[int | None, int | None] | None = None,
    normalize: bool = True,
    stain: StainGrey = "luminance",
) -> Normalizer:
    """A :class:`Normalizer` from strided samples (each (h, w, C)) of the whole image; ``stain``: the model's
    colour rule (:func:`cellsam.inference.preprocess.stain_grey`)."""
    if not normalize:
        if channels is not None or n_channels != 3:
            raise ValueError(
                "normalize=False expects an already normalised 3-channel CellSAM image and no channels=; "
                f"got {n_channels} channel(s), channels={channels!r}"
            )
        return Normalizer(prepared=True)
    for s in samples:
        check_finite(s)
    picks = channel_picks(n_channels, channels)
    flat = np.concatenate([s.reshape(-1, 1, s.shape[-1]) for s in samples], axis=0)
    invert, range_top = False, None
    if -1 in picks:
        range_top = rgb_range_top(flat)
        invert = rgb_inverts(flat, top=range_top)
    lo, hi = [0.0, 0.0], [0.0, 0.0]
    probe = Normalizer(prepared=False, picks=picks, invert=invert, top=range_top, stain=stain)
    for k, pick in enumerate(picks):
        if pick is None:
            continue
        x = probe._raw(flat, pick)
        nonzero = x[x != 0]
        if nonzero.size == 0:
            continue
        top = float(np.percentile(nonzero, CLIP_PERCENTILE))
        lo[k], hi[k] = float(min(x.min(), top)), top
    return Normalizer(prepared=False, picks=picks, invert=invert, top=range_top, lo=(lo[0], lo[1]),
                      hi=(hi[0], hi[1]), stain=stain)


def prepare_window(source: ImageSource, norm: Normalizer, rect: Rect) -> np.ndarray:
    """CellSAM's (3, h, w) [0, 1] image on ``rect``; CLAHE sees a ``CLAHE_KERNEL`` halo around it."""
    y0, x0, y1, x1 = rect
    halo = 0 if norm.prepared or not norm.clahe else CLAHE_KERNEL
    h, w = source.shape
    gy0, gx0, gy1, gx1 = max(0, y0 - halo), max(0, x0 - halo), min(h, y1 + halo), min(w, x1 + halo)
    out = norm.apply(source.read((gy0, gx0, gy1, gx1)))
    return np.ascontiguousarray(out[:, y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0])
