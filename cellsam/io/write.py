"""Writing segmentation outputs: label TIFF, outline overlay PNG, per-cell CSV, COCO instances."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

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
