"""Reading users' images (TIFF, PNG, JPEG, NPY, OME-Zarr) and writing segmentation outputs.

Readers report the channel axis only when the file format states it (RGB PNG/JPEG, TIFF axes
metadata ``C``/``S``, OME-Zarr ``c`` axis); otherwise ``channel_axis`` is None and a 3-D array needs
the user's ``--channel-axis``. Singleton T/Z/C axes are squeezed; a real z-stack or time series
is refused (segment its 2-D planes instead).
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterable
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


def _squeeze_axes(data: np.ndarray, axes: str, path: Path) -> LoadedImage:
    """Drop singleton non-spatial axes; keep Y, X and one channel axis (C or S)."""
    axes = axes.upper()
    if len(axes) != data.ndim:
        raise ImageReadError(f"{path}: axes {axes!r} do not match the array shape {data.shape}")
    keep = [i for i, a in enumerate(axes) if a in "YX" or data.shape[i] > 1]
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    extra = [a for a in axes if a not in "YX"]
    if len(extra) == 0:
        return LoadedImage(data, None, path)
    if len(extra) == 1 and extra[0] in "CS":
        return LoadedImage(data, axes.index(extra[0]), path)
    if len(extra) == 1 and extra[0] in "QI":  # unnamed axis (tifffile): the user must say what it is
        return LoadedImage(data, None, path)
    raise ImageReadError(
        f"{path}: image has axes {axes} with shape {data.shape}; only 2-D images (with channels) are "
        "supported: split z-stacks / time series into 2-D planes"
    )


def _read_tiff(path: Path) -> LoadedImage:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        return _squeeze_axes(series.asarray(), series.axes, path)


def _read_pil(path: Path) -> LoadedImage:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
        if im.mode == "LA":
            im = im.getchannel("L")
        if im.mode == "1":
            im = im.convert("L")
        data = np.asarray(im)
    return LoadedImage(data, -1 if data.ndim == 3 else None, path)


def _read_ome_zarr(path: Path) -> LoadedImage:
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
        arr = group[ms["datasets"][0]["path"]]
        axes = "".join((a["name"] if isinstance(a, dict) else a)[0] for a in ms.get("axes", [])) or None
    elif hasattr(group, "shape"):  # a bare zarr array
        arr, axes = group, None
    else:
        raise ImageReadError(f"{path}: a zarr group without OME 'multiscales' metadata")
    data = np.asarray(arr[...])
    if axes is None:
        if data.ndim > 3:
            raise ImageReadError(f"{path}: zarr array of shape {data.shape} without axes metadata")
        return LoadedImage(data, None, path)
    return _squeeze_axes(data, axes, path)


def load_image(path: str | Path) -> LoadedImage:
    """Read one image file (or OME-Zarr folder). Raises :class:`ImageReadError` with the reason."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(
            f"{path}: unsupported file type {suffix!r} (supported: {', '.join(IMAGE_SUFFIXES)})"
        )
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
