"""Uploaded files (content-checked, size-limited), channel roles, and what the page displays.

Uploads are identified by their first bytes, not their name: PNG, JPEG and TIFF (incl. BigTIFF)
only. Their pixel count is read from the header before decoding (no decompression bombs), and they
are decoded before they are accepted: anything that does not decode as an image is refused with 415.
The stored file ends in the suffix of its content (``cells`` holding a TIFF is kept as ``cells.tif``),
so it is read back by the same reader that accepted it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.data.normalize import StainGrey

MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
    (b"II+\x00", ".tif"),
    (b"MM\x00+", ".tif"),
)
MAX_CHANNELS = 16
SUFFIX_ALIASES = {".tif": (".tif", ".tiff"), ".png": (".png",), ".jpg": (".jpg", ".jpeg")}


class UploadError(ValueError):
    """A rejected upload; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Upload limits: bytes of one file and pixels (H x W) of one image."""

    max_bytes: int = 1 << 30
    max_pixels: int = 200_000_000


@dataclass(frozen=True)
class DecodedUpload:
    """An accepted upload: its pixels, channel axis (None for 2-D) and file suffix from its content."""

    data: np.ndarray
    channel_axis: int | None
    suffix: str


def sniff(content: bytes) -> str:
    """File suffix from the content's magic bytes; ``UploadError`` (415) for anything else."""
    for magic, suffix in MAGIC:
        if content.startswith(magic):
            return suffix
    raise UploadError("unsupported file type: only TIFF, PNG and JPEG images can be uploaded", 415)


def stored_name(name: str, suffix: str) -> str:
    """``name`` ending in a suffix of its content's type: kept if it has one, else ``suffix`` appended."""
    if Path(name).suffix.lower() in SUFFIX_ALIASES.get(suffix, (suffix,)):
        return name
    return f"{name}{suffix}"


def readable_path(path: Path, stack: Any) -> Path:
    """``path``, or where its suffix is not an image's, a link to it named by its content's type
    (files stored before uploads were renamed by content); ``stack``: an ``ExitStack`` that owns the link."""
    from cellsam.io import IMAGE_SUFFIXES

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return path
    with open(path, "rb") as f:
        suffix = sniff(f.read(16))
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cellsam-read-")))
    link = tmp / f"image{suffix}"
    link.symlink_to(path.resolve())
    return link


def _header_pixels(path: Path, suffix: str) -> int:
    """H x W from the file header, without decoding the pixels."""
    if suffix == ".tif":
        import tifffile

        with tifffile.TiffFile(path) as tf:
            shape, axes = tf.series[0].shape, tf.series[0].axes
        return int(np.prod([s for s, a in zip(shape, axes, strict=True) if a in "YX"] or [0]))
    from PIL import Image

    with Image.open(path) as im:
        return int(im.size[0] * im.size[1])


def read_upload(
    content: bytes, filename: str, *, limits: Limits, channel_axis: int | None = None
) -> DecodedUpload:
    """Check and decode an uploaded image.

    Args:
        content: the file's bytes. filename: only used in messages.
        channel_axis: the user's channel axis for a 3-D image whose file does not say it.
    Returns:
        the pixels, the channel axis (None for 2-D) and the suffix of the content's type.
    Raises:
        UploadError: empty (400) / too large (413) / not an image or not decodable (415) / bad layout (422).
    """
    from cellsam.io import ImageReadError, load_image

    if not content:
        raise UploadError(f"{filename}: the file is empty")
    if len(content) > limits.max_bytes:
        raise UploadError(f"{filename}: {len(content)} bytes is over the upload limit of {limits.max_bytes}", 413)
    suffix = sniff(content)
    with tempfile.TemporaryDirectory(prefix="cellsam-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(content)
        try:
            pixels = _header_pixels(path, suffix)
        except Exception as e:  # noqa: BLE001 - any header error means a corrupt file
            kind = suffix[1:].upper()
            raise UploadError(f"{filename}: not a readable {kind} file ({type(e).__name__}: {e})", 415) from None
        if pixels > limits.max_pixels:
            raise UploadError(f"{filename}: {pixels} pixels is over the limit of {limits.max_pixels}", 413)
        try:
            loaded = load_image(path)
        except ImageReadError as e:
            raise UploadError(f"{filename}: not a readable image: {str(e).split(': ', 1)[-1]}", 415) from None
    data, axis = loaded.data, loaded.channel_axis
    if data.ndim == 3 and axis is None:
        if channel_axis is None:
            raise UploadError(
                f"{filename}: a 3-D image of shape {data.shape} whose file does not say where its channels are; "
                "choose the channel axis (first or last) and upload it again", 422)
        axis = channel_axis
    if data.ndim == 3 and axis is not None and data.shape[axis] > MAX_CHANNELS:  # axis is set for 3-D here
        raise UploadError(
            f"{filename}: {data.shape[axis]} channels along axis {axis} (shape {data.shape}); at most "
            f"{MAX_CHANNELS}: is the channel axis right?", 422)
    if data.ndim not in (2, 3):
        raise UploadError(f"{filename}: expected a 2-D image (with channels), got shape {data.shape}", 422)
    return DecodedUpload(data=data, channel_axis=axis if data.ndim == 3 else None, suffix=suffix)


def channels_of(rec: Any) -> tuple[int | None, int | None] | None:
    """``channels=`` for :func:`~cellsam.inference.preprocess.prepare_image` from an image record."""
    if rec.nuclear is None and rec.wholecell is None:
        return None
    return rec.nuclear, rec.wholecell


def channel_key(rec: Any) -> tuple[int, int | None, int | None]:
    """Cache key of an image under its current channel roles."""
    return rec.id, rec.nuclear, rec.wholecell


def load_raw(path: Path, rec: Any) -> np.ndarray:
    """The image file as (H, W, C)."""
    from contextlib import ExitStack

    from cellsam.inference.preprocess import to_channels_last
    from cellsam.io import load_image

    with ExitStack() as stack:
        data = load_image(readable_path(path, stack)).data
    return to_channels_last(data, channel_axis=rec.channel_axis)


def prepare(raw_hwc: np.ndarray, rec: Any, stain: StainGrey = "luminance") -> np.ndarray:
    """(H, W, C) raw -> (3, H, W) float32 in [0, 1] (CellSAM's layout) under the record's roles, stained
    colour pictures made grey by ``stain`` (the model's :func:`~cellsam.inference.preprocess.stain_grey`)."""
    from cellsam.inference.preprocess import prepare_image

    if raw_hwc.shape[2] == 1:
        return prepare_image(raw_hwc[..., 0], channels=channels_of(rec))
    return prepare_image(raw_hwc, channel_axis=-1, channels=channels_of(rec), stain=stain)


def display_rgb(raw_hwc: np.ndarray, prepared: np.ndarray, rec: Any) -> np.ndarray:
    """(H, W, 3) uint8 for the page: colour pictures as they are; else whole-cell in magenta and
    nuclear in green when both are set, grey when one is."""
    from cellsam.data.normalize import is_grey_rgb
    from cellsam.io import rgb_display

    if channels_of(rec) is None and raw_hwc.shape[2] in (3, 4) and not is_grey_rgb(raw_hwc[..., :3]):
        return rgb_display(raw_hwc)
    nuc, wc = prepared[1], prepared[2]
    if rec.nuclear is not None and rec.wholecell is not None:
        rgb = np.stack([wc, nuc, wc], axis=-1)
    else:
        grey = np.maximum(nuc, wc)
        rgb = np.stack([grey, grey, grey], axis=-1)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
    """Encode (H, W, 3) uint8 or (H, W) uint8 / uint16 as PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
