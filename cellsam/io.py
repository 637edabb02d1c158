"""Reading users' images (TIFF, PNG, JPEG, NPY, OME-Zarr) and writing segmentation outputs.

Readers report the channel axis only when the file format states it (RGB PNG/JPEG, TIFF axes
metadata ``C``/``S``, OME-Zarr ``c`` axis); otherwise ``channel_axis`` is None and a 3-D array needs
the user's ``--channel-axis``. Singleton T/Z/C axes are squeezed; a real z-stack or time series
is refused (segment its 2-D planes instead).

Sizes come from the file's header before anything is decoded (:func:`probe_image`): TIFF series
shape, PIL's size for PNG / JPEG, the ``.npy`` header, the zarr array's shape. ``load_image(path,
max_pixels=N)`` refuses an image above N pixels with :class:`ImageTooLarge` before decoding it;
:func:`default_max_pixels` is the limit this machine's available memory allows for in-memory
segmentation (larger images go block by block through :mod:`cellsam.distributed`).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".zarr")
CSV_COLUMNS = (
    "label",
    "area",
    "centroid_y",
    "centroid_x",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "score",
    "iou_pred",
)


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


def _read_pil(path: Path) -> LoadedImage:
    from PIL import Image

    with _pil_any_size(), Image.open(path) as opened:  # the size limit is max_pixels, checked before
        opened.load()
        im: Image.Image = opened
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        if im.mode == "LA":
            im = im.getchannel("L")
        if im.mode == "1":
            im = im.convert("L")
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

IN_MEMORY_BYTES_PER_PIXEL = 48
"""Peak memory of in-memory segmentation (``cellsam segment`` without ``--dask``) per image pixel, model and
runtime excluded: 43 bytes measured on uint16 grey images (peak RSS 1.31 GB at 4096 x 4096, 2.19 GB at
6144 x 6144; 40 bytes from 2048 x 2048 to 3072 x 3072 with 1,600 / 3,600 cells), rounded up for
colour and float inputs."""

MEMORY_MARGIN = 0.8
"""Share of the available memory :func:`default_max_pixels` lets one image use."""


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
        mode, bands, info = im.mode, len(im.getbands()), dict(im.info)
    if mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):  # converted as _read_pil does
        bands = 4 if "A" in mode or "transparency" in info else 3
    if mode in ("LA", "1"):
        bands = 1
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


def estimated_bytes(info: ImageInfo) -> int:
    """Memory that in-memory segmentation of this image takes at its peak (model excluded)."""
    return info.pixels * IN_MEMORY_BYTES_PER_PIXEL


def check_image_size(info: ImageInfo, max_pixels: int) -> None:
    """Raise :class:`ImageTooLarge` when ``info`` has more than ``max_pixels`` pixels."""
    if info.pixels > max_pixels:
        raise ImageTooLarge(info, max_pixels)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int | None:
    """Memory this process can still take: Linux ``MemAvailable``, capped by a cgroup v2 limit (containers);
    psutil elsewhere when installed; None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except ImportError:
            return None
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        avail = max(limit - used, 0) if avail is None else min(avail, max(limit - used, 0))
    return avail


FALLBACK_MAX_PIXELS = 100_000_000
""":func:`default_max_pixels` where the available memory is unknown."""


def default_max_pixels(available: int | None = None) -> int:
    """The most pixels in-memory segmentation should take on this machine: ``MEMORY_MARGIN`` of the
    available memory (:func:`available_memory_bytes` when ``available`` is None) at
    ``IN_MEMORY_BYTES_PER_PIXEL``; ``FALLBACK_MAX_PIXELS`` when that is unknown."""
    avail = available_memory_bytes() if available is None else available
    if avail is None:
        return FALLBACK_MAX_PIXELS
    return max(int(avail * MEMORY_MARGIN) // IN_MEMORY_BYTES_PER_PIXEL, 1)


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


# ------------------------------------------------------------------------------------------- writing
def write_labels(path: str | Path, labels: np.ndarray) -> Path:
    """Write an (H, W) label image as a zlib-compressed TIFF: uint16, or uint32 above 65535 labels."""
    import tifffile

    labels = np.asarray(labels)
    dtype = np.uint16 if int(labels.max(initial=0)) <= np.iinfo(np.uint16).max else np.uint32
    tifffile.imwrite(path, labels.astype(dtype), compression="zlib")
    return Path(path)


def display_image(image: np.ndarray) -> np.ndarray:
    """A normalised CellSAM image (3, H, W) in [0, 1] -> grey (H, W, 3) uint8, the pixel-wise max of
    its nuclear and whole-cell channels."""
    grey = (np.clip(np.asarray(image)[1:].max(axis=0), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def rgb_display(image: np.ndarray) -> np.ndarray:
    """An RGB(A) picture (H, W, 3|4) of any dtype -> (H, W, 3) uint8 (integers scaled by the dtype's max)."""
    image = np.asarray(image)
    rgb = image[..., :3].astype(np.float64)
    top = float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else max(rgb.max(), 1.0)
    return (np.clip(rgb / top, 0, 1) * 255).astype(np.uint8)


def write_overlay(path: str | Path, display: np.ndarray, labels: np.ndarray, color=(255, 40, 40)) -> Path:
    """Save ``display`` (H, W, 3) uint8 with the cells' outlines of ``labels`` painted in ``color`` as PNG."""
    from PIL import Image

    from cellsam.ops.masks import outlines

    out = np.array(display, np.uint8, copy=True)
    out[outlines(labels)] = color
    Image.fromarray(out).save(path)
    return Path(path)


def cell_table(
    labels: np.ndarray, scores: np.ndarray | None = None, ious: np.ndarray | None = None
) -> list[dict]:
    """One row per label 1..N of ``labels``: area, centroid, bbox (exclusive end), score, iou_pred.

    ``scores[k]`` / ``ious[k]`` belong to label ``k + 1``, as in
    :class:`~cellsam.inference.segment.Segmentation`.
    """
    labels = np.asarray(labels)
    n = int(labels.max(initial=0))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones(labels.shape), labels, index)
    cents = ndimage.center_of_mass(np.ones(labels.shape), labels, index)
    rows = []
    for lab, sl in enumerate(ndimage.find_objects(labels, max_label=n), start=1):
        if sl is None:
            continue
        rows.append(
            {
                "label": lab,
                "area": int(areas[lab - 1]),
                "centroid_y": round(float(cents[lab - 1][0]), 2),
                "centroid_x": round(float(cents[lab - 1][1]), 2),
                "bbox_y0": sl[0].start,
                "bbox_x0": sl[1].start,
                "bbox_y1": sl[0].stop,
                "bbox_x1": sl[1].stop,
                "score": round(float(scores[lab - 1]), 4) if scores is not None else "",
                "iou_pred": round(float(ious[lab - 1]), 4) if ious is not None else "",
            }
        )
    return rows


def write_cells_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write :func:`cell_table` rows (header only when there are no cells)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def coco_dict(
    labels: np.ndarray, scores: np.ndarray | None, file_name: str, *, image_id: int = 1
) -> dict[str, Any]:
    """COCO instances of a label image: one annotation per label with an RLE mask, area, xywh bbox and
    ``score`` (the label's box score), category 1 "cell"."""
    from pycocotools import mask as mask_utils

    labels = np.asarray(labels)
    h, w = labels.shape
    anns = []
    m = np.zeros((h, w), np.uint8, order="F")
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        m[sl] = labels[sl] == lab
        rle = mask_utils.encode(m)
        m[sl] = 0
        rle["counts"] = rle["counts"].decode("ascii")
        x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
        anns.append(
            {
                "id": lab,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": [x, y, bw, bh],
                "iscrowd": 0,
                "score": float(scores[lab - 1]) if scores is not None else 1.0,
            }
        )
    return {
        "images": [{"id": image_id, "file_name": file_name, "height": h, "width": w}],
        "categories": [{"id": 1, "name": "cell"}],
        "annotations": anns,
    }


def write_coco(path: str | Path, coco: dict[str, Any]) -> Path:
    Path(path).write_text(json.dumps(coco))
    return Path(path)
