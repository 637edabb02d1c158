"""One annotated source image as every reader yields it, and the file loading they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cellsam.data.normalize import StainGrey, rgb_to_channel

Role = Literal["nuclear", "whole-cell"]
Target = Literal["nuclear", "whole-cell", "unknown"]

IMAGE_EXTS = (".tif", ".tiff", ".png", ".npy", ".jpg", ".jpeg", ".bmp")


class SampleError(ValueError):
    """A problem with one input file (bad shapes, labels, unreadable file)."""

    def __init__(self, path: str | Path, message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{path}: {message}")


@dataclass
class Sample:
    """A raw annotated image from a source.

    Attributes:
        image: (C, H, W) raw intensities (any numeric dtype), C = len(roles).
        labels: (H, W) int32 instance labels, 0 background (not yet filtered).
        roles: role of each image channel, "nuclear" or "whole-cell" (phase, bright-field and
            membrane channels count as whole-cell).
        source: data set name (e.g. "dsb2018").
        image_id: stable id of the source image, unique within the source (used for splits).
        path: the primary image file, relative to the source's parent folder where possible.
        files: every file the sample was read from (role -> path, plus "labels").
        target: what the labels outline.
        kind: free text (cell type / modality), "unknown" if not known.
        split: the source's own split ("train" / "val" / "test") or None.
    """

    image: np.ndarray
    labels: np.ndarray
    roles: tuple[Role, ...]
    source: str
    image_id: str
    path: str
    files: dict[str, str] = field(default_factory=dict)
    target: Target = "unknown"
    kind: str = "unknown"
    split: str | None = None


def load_array(path: Path) -> np.ndarray:
    """Read an image file (TIFF, PNG/JPEG/BMP via Pillow, or .npy) as a numpy array."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    except Exception as e:  # noqa: BLE001 - any decoder error means a corrupt/unreadable file
        raise SampleError(path, f"cannot read file ({type(e).__name__}: {e})") from None


def image_to_channels(arr: np.ndarray, path: Path, stain: StainGrey = "luminance") -> np.ndarray:
    """Raw image -> (C, H, W): 2-D stays one channel, RGB(A) becomes one channel by
    :func:`~cellsam.data.normalize.rgb_to_channel` (stained pictures by ``stain``). Other shapes raise
    :class:`SampleError`."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return rgb_to_channel(arr, stain=stain)[None]
    if arr.ndim == 3 and arr.shape[0] == 1:
        return arr
    raise SampleError(path, f"unsupported image shape {arr.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")


def check_labels(labels: np.ndarray, path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Validate a label image and return it as int32 (H, W).

    Raises :class:`SampleError` for float labels with fractional values, negative values,
    wrong rank, or a size different from ``shape``.
    """
    labels = np.asarray(labels)
    if labels.ndim == 3 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 2:
        raise SampleError(path, f"label image must be 2-D, got shape {labels.shape}")
    if labels.dtype == bool:
        labels = labels.astype(np.int32)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or not np.array_equal(labels, np.round(labels)):
            raise SampleError(path, f"label image has non-integer values (dtype {labels.dtype})")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise SampleError(path, f"label image has unsupported dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise SampleError(path, f"label image has negative values (min {labels.min()})")
    if labels.size and labels.max() > np.iinfo(np.int32).max:
        raise SampleError(path, "label values exceed int32")
    if shape is not None and labels.shape != tuple(shape):
        raise SampleError(path, f"label size {labels.shape} does not match image size {tuple(shape)}")
    return labels.astype(np.int32)
