"""Reading users' images (TIFF, PNG, JPEG, NPY, OME-Zarr), and their layout from the file header.

Readers report the channel axis only when the file format states it (RGB PNG/JPEG, TIFF axes
metadata ``C``/``S``, OME-Zarr ``c`` axis); otherwise ``channel_axis`` is None and a 3-D array needs
the user's ``--channel-axis``. Singleton T/Z/C axes are squeezed; a real z-stack or time series
is refused (segment its 2-D planes instead).

Sizes come from the file's header before anything is decoded (:func:`probe_image`): TIFF series
shape, PIL's size for PNG / JPEG, the ``.npy`` header, the zarr array's shape. ``load_image(path,
max_pixels=N)`` refuses an image above N pixels with :class:`ImageTooLarge` before decoding it;
:func:`cellsam.io.memory.default_max_pixels` is the limit this machine's available memory allows.
"""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.io.memory import estimated_bytes

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".zarr")


class ImageReadError(ValueError):
    """A file that cannot be read as an image (corrupt, unsupported format or layout)."""


@dataclass
class LoadedImage:
    """An image as read from disk.

    Attributes:
        data: the pixel array (2-D, or 3-D with channels on ``channel_axis``).
        channel_axis: the channel axis when the file format says where it is, else None.
        path: the file it came from.
    """

    data: np.ndarray
    channel_axis: int | None
    path: Path


def image_name(path: Path) -> str:
    """Output stem of an input: ``a/b/x.ome.tif`` -> ``x``."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _layout(shape: tuple[int, ...], axes: str, path: Path) -> tuple[tuple[int, ...], int | None]:
    """(shape without singleton non-spatial axes, channel axis or None); Y, X and one channel axis (C or S)."""
    axes = axes.upper()
    if len(axes) != len(shape):
        raise ImageReadError(f"{path}: axes {axes!r} do not match the array shape {tuple(shape)}")
    keep = [i for i, a in enumerate(axes) if a in "YX" or shape[i] > 1]
    shape = tuple(int(shape[i]) for i in keep)
    axes = "".join(axes[i] for i in keep)
    extra = [a for a in axes if a not in "YX"]
    if len(extra) == 0:
        return shape, None
    if len(extra) == 1 and extra[0] in "CS":
        return shape, axes.index(extra[0])
    if len(extra) == 1 and extra[0] in "QI":  # unnamed axis (tifffile): the user must say what it is
        return shape, None
    raise ImageReadError(
        f"{path}: image has axes {axes} with shape {shape}; only 2-D images (with channels) are "
        "supported: split z-stacks / time series into 2-D planes"
    )


def _squeeze_axes(data: np.ndarray, axes: str, path: Path) -> LoadedImage:
    """Drop singleton non-spatial axes; keep Y, X and one channel axis (C or S)."""
    shape, channel_axis = _layout(data.shape, axes, path)
    return LoadedImage(data.reshape(shape), channel_axis, path)


def _read_tiff(path: Path) -> LoadedImage:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        return _squeeze_axes(series.asarray(), series.axes, path)


def _pil_target_mode(mode: str, info: dict) -> str:
    """The PIL mode :func:`_read_pil` turns a picture of ``mode`` into (and :func:`_probe_pil` reports):
    palette and other colour spaces -> RGB (RGBA with transparency), grey + alpha and 1-bit -> L."""
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        return "RGBA" if "A" in mode or "transparency" in info else "RGB"
    return "L" if mode in ("LA", "1") else mode


def _read_pil(path: Path) -> LoadedImage:
    from PIL import Image

    with _pil_any_size(), Image.open(path) as opened:  # the size limit is max_pixels, checked before
        opened.load()
        im: Image.Image = opened
        target = _pil_target_mode(im.mode, im.info)
        if target != im.mode:
            im = im.getchannel("L") if im.mode == "LA" else im.convert(target)
        data = np.asarray(im)
    return LoadedImage(data, -1 if data.ndim == 3 else None, path)


def _open_zarr(path: Path) -> tuple[Any, str | None]:
    """(zarr array of the full-resolution level, its axes letters or None); nothing is read."""
    try:
        import zarr
    except ImportError:
        raise ImageReadError(
            f"{path}: reading OME-Zarr needs the zarr package (pip install 'zarr>=2.16,<3')"
        ) from None
    group = zarr.open(str(path), mode="r")
    attrs = dict(getattr(group, "attrs", {}))
    if "multiscales" in attrs:
        ms = attrs["multiscales"][0]
        axes = "".join((a["name"] if isinstance(a, dict) else a)[0] for a in ms.get("axes", [])) or None
        return group[ms["datasets"][0]["path"]], axes
    if hasattr(group, "shape"):  # a bare zarr array
        return group, None
    raise ImageReadError(f"{path}: a zarr group without OME 'multiscales' metadata")


def _read_ome_zarr(path: Path) -> LoadedImage:
    arr, axes = _open_zarr(path)
    data = np.asarray(arr[...])
    if axes is None:
        if data.ndim > 3:
            raise ImageReadError(f"{path}: zarr array of shape {data.shape} without axes metadata")
        return LoadedImage(data, None, path)
    return _squeeze_axes(data, axes, path)


def _check_path(path: Path) -> None:
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageReadError(
            f"{path}: unsupported file type {path.suffix.lower()!r} (supported: {', '.join(IMAGE_SUFFIXES)})"
        )


def load_image(path: str | Path, *, max_pixels: int | None = None) -> LoadedImage:
    """Read one image file (or OME-Zarr folder). Raises :class:`ImageReadError` with the reason.

    Args:
        max_pixels: refuse an image of more than this many pixels (H x W, read from the file's header
            by :func:`probe_image`) with :class:`ImageTooLarge` before decoding it. None: no limit.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    _check_path(path)
    if max_pixels is not None:
        check_image_size(probe_image(path), max_pixels)
    try:
        if suffix in (".tif", ".tiff"):
            img = _read_tiff(path)
        elif suffix == ".npy":
            img = LoadedImage(np.load(path, allow_pickle=False), None, path)
        elif suffix == ".zarr":
            img = _read_ome_zarr(path)
        else:
            img = _read_pil(path)
    except ImageReadError:
        raise
    except Exception as e:  # any decoder error means: this file is unreadable
        raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    if img.data.size == 0:
        raise ImageReadError(f"{path}: empty image")
    return img


# ------------------------------------------------------------------------- sizes, before decoding
BLOCKWISE_SUFFIXES = (".tif", ".tiff", ".npy", ".zarr")
"""Formats :mod:`cellsam.distributed` reads window by window (PNG / JPEG are decoded whole)."""


@dataclass(frozen=True)
class ImageInfo:
    """An image's layout read from its file header (no pixel decoded).

    Attributes:
        path: the file. shape: the array shape :func:`load_image` would return (singleton non-spatial
            axes dropped). dtype: its element type (PNG / JPEG: after the mode conversions of the reader).
        channel_axis: as :func:`load_image` would report it (None when the file does not say).
    """

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    channel_axis: int | None

    @property
    def side(self) -> tuple[int, int]:
        """(H, W); for a 3-D image whose channel axis the file does not state, its two largest sides (an
        upper bound of H x W whichever axis holds the channels)."""
        shape = self.shape
        if len(shape) == 3 and self.channel_axis is not None:
            h, w = (s for i, s in enumerate(shape) if i != self.channel_axis % 3)
            return h, w
        if len(shape) < 2:
            return (shape[0] if shape else 0), 1
        i, j = sorted(sorted(range(len(shape)), key=lambda k: -shape[k])[:2])
        return shape[i], shape[j]

    @property
    def pixels(self) -> int:
        """H x W (see :attr:`side`)."""
        h, w = self.side
        return int(h) * int(w)

    @property
    def blockwise(self) -> bool:
        """Whether :mod:`cellsam.distributed` can read this file window by window."""
        return self.path.suffix.lower() in BLOCKWISE_SUFFIXES


class ImageTooLarge(ImageReadError):
    """An image with more pixels than the caller's limit, found from its header before decoding.

    Attributes: info (the :class:`ImageInfo`), max_pixels (the limit).
    """

    def __init__(self, info: ImageInfo, max_pixels: int) -> None:
        self.info, self.max_pixels = info, int(max_pixels)
        h, w = info.side
        how = (
            "segment it block by block with cellsam.distributed.segment_dask"
            if info.blockwise
            else f"{info.path.suffix.lower()} files are decoded whole: convert it to a tiled TIFF or "
            "OME-Zarr and segment it block by block with cellsam.distributed.segment_dask"
        )
        super().__init__(
            f"{info.path}: {h}x{w} image ({info.pixels / 1e6:,.0f} megapixels) is above max_pixels="
            f"{self.max_pixels} ({self.max_pixels / 1e6:,.0f} megapixels; in memory it would need about "
            f"{estimated_bytes(info) / 2**30:,.0f} GiB): {how}"
        )


def _probe_tiff(path: Path) -> ImageInfo:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        shape, axis = _layout(tuple(series.shape), series.axes, path)
        return ImageInfo(path, shape, np.dtype(series.dtype), axis)


@contextlib.contextmanager
def _pil_any_size() -> Iterator[None]:
    """PIL refuses to open images above 2 x ``MAX_IMAGE_PIXELS`` (a "decompression bomb", about 179 MP);
    cellsam's own limit is ``max_pixels`` (checked from the header before decoding, :func:`load_image`), so
    PIL's check is lifted while :func:`probe_image` and the reader open the file."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _probe_pil(path: Path) -> ImageInfo:
    from PIL import Image

    with _pil_any_size(), Image.open(path) as im:
        w, h = im.size
        mode, info = im.mode, dict(im.info)
    bands = Image.getmodebands(_pil_target_mode(mode, info))  # as _read_pil converts it
    dtype = np.dtype(np.uint16 if mode.startswith("I;16") else np.int32 if mode == "I" else
                     np.float32 if mode == "F" else np.uint8)
    return ImageInfo(path, (h, w) if bands == 1 else (h, w, bands), dtype, None if bands == 1 else -1)


def _probe_npy(path: Path) -> ImageInfo:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return ImageInfo(path, tuple(int(s) for s in shape), np.dtype(dtype), None)


def _probe_zarr(path: Path) -> ImageInfo:
    arr, axes = _open_zarr(path)
    shape = tuple(int(s) for s in arr.shape)
    if axes is None:
        return ImageInfo(path, shape, np.dtype(arr.dtype), None)
    shape, axis = _layout(shape, axes, path)
    return ImageInfo(path, shape, np.dtype(arr.dtype), axis)


def probe_image(path: str | Path) -> ImageInfo:
    """An image file's shape, dtype and channel axis from its header, without decoding any pixel.

    Raises :class:`ImageReadError` for files :func:`load_image` could not read either (missing,
    unsupported type, unreadable header, z-stack / time series).
    """
    path = Path(path)
    _check_path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            return _probe_tiff(path)
        if suffix == ".npy":
            return _probe_npy(path)
        if suffix == ".zarr":
            return _probe_zarr(path)
        return _probe_pil(path)
    except ImageReadError:
        raise
    except Exception as e:  # any header error means: this file is unreadable
        raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e

def check_image_size(info: ImageInfo, max_pixels: int) -> None:
    """Raise :class:`ImageTooLarge` when ``info`` has more than ``max_pixels`` pixels."""
    if info.pixels > max_pixels:
        raise ImageTooLarge(info, max_pixels)

def read_image(path: str | Path) -> np.ndarray:
    """The pixel array of an image file (see :func:`load_image` for the channel axis)."""
    return load_image(path).data


def find_images(inputs: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Expand files, folders (their images, not recursive) and glob patterns.

    Returns:
        (image paths in input order without duplicates, inputs that matched nothing).
    """
    found: list[Path] = []
    missing: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir() and p.suffix.lower() != ".zarr":
            hits = sorted(
                q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith(".")
            )
        elif p.exists():
            hits = [p]
        else:
            hits = sorted(Path(q) for q in glob.glob(str(item)) if Path(q).suffix.lower() in IMAGE_SUFFIXES)
        if not hits:
            missing.append(str(item))
        found += [h for h in hits if h not in found]
    return found, missing
