"""Real-image benchmark scenes from a DSB 2018 folder (``<id>_img.png`` + ``<id>_masks.png``).

The synthetic scenes time the pipeline on supplied boxes; these time it as a user meets it: the
model's own CellFinder on real nuclei, as dense as they come.

* ``dense512``: the 512 x 512 crop (on a 64-pixel grid) with the most whole nuclei among the
  folder's grey fluorescence images;
* ``mosaic2048``: a 2048 x 2048 mosaic of the folder's grey images (sorted by name, packed in rows,
  labels renumbered), the "whole slide" case.

Both are :class:`~cellsam.bench.pipeline.Scene` objects (uint16 image, labels, boxes), so Cellpose is
timed on them the same way (its masks built from the ideal flows of the true nuclei).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.segmentation import relabel_sequential

from cellsam.bench.pipeline import Scene
from cellsam.ops.boxes import masks_to_boxes

__all__ = ["REAL_SCENES", "real_scene"]

REAL_SCENES = ("dense512", "mosaic2048")


def _grey_images(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, (H, W) uint8 image, (H, W) int32 labels) of the folder's grey (R = G = B) images, by name."""
    from cellsam.data.sample import load_array

    out = []
    for img_path in sorted(folder.glob("*_img.png")):
        mask_path = img_path.with_name(img_path.name.replace("_img.png", "_masks.png"))
        if not mask_path.is_file():
            continue
        rgb = np.asarray(load_array(img_path))
        if rgb.ndim == 3 and rgb.shape[-1] >= 3:
            if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
                continue
            rgb = rgb[..., 0]
        if rgb.ndim != 2 or rgb.mean() > 128:  # bright-field backgrounds: not fluorescence
            continue
        labels = np.asarray(load_array(mask_path), np.int32)
        out.append((img_path.name[: -len("_img.png")], rgb.astype(np.uint8), labels))
    if not out:
        raise ValueError(f"{folder}: no grey DSB images (<id>_img.png with <id>_masks.png) found")
    return out


def _scene(image: np.ndarray, labels: np.ndarray, name: str) -> Scene:
    lab = relabel_sequential(labels.astype(np.int32))[0]
    n = int(lab.max())
    boxes = masks_to_boxes(lab).numpy().astype(np.float32) if n else np.zeros((0, 4), np.float32)
    h, w = lab.shape
    per_512 = max(1, int(round(n * 512**2 / (h * w))))
    return Scene(image=image.astype(np.uint16) * 257, labels=lab, boxes=boxes, cells=per_512, name=name)


def _whole_in(labels: np.ndarray, y: int, x: int, side: int) -> int:
    """Nuclei entirely inside the crop (not cut by its border)."""
    crop = labels[y : y + side, x : x + side]
    inside = set(np.unique(crop).tolist()) - {0}
    border = set(np.unique(np.concatenate([crop[0], crop[-1], crop[:, 0], crop[:, -1]])).tolist())
    return len(inside - border)


def real_scene(name: str, folder: str | Path) -> Scene:
    """The real-image scene ``name`` (one of :data:`REAL_SCENES`) built from a DSB 2018 folder."""
    if name not in REAL_SCENES:
        raise ValueError(f"unknown real scene {name!r}; choose one of {REAL_SCENES}")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"real scenes need the DSB 2018 folder (e.g. ../shared/data/dsb2018): {folder}")
    images = _grey_images(folder)
    if name == "dense512":
        best: tuple[int, tuple[np.ndarray, np.ndarray] | None] = (-1, None)  # (nuclei, (image, labels) crop)
        for _, img, lab in images:
            h, w = lab.shape
            if h < 512 or w < 512:
                continue
            for y in range(0, h - 511, 64):
                for x in range(0, w - 511, 64):
                    n = _whole_in(lab, y, x, 512)
                    if n > best[0]:
                        best = (n, (img[y : y + 512, x : x + 512], lab[y : y + 512, x : x + 512]))
        if best[1] is None:
            raise ValueError(f"{folder}: no grey image of at least 512 x 512 pixels")
        return _scene(best[1][0], best[1][1], name)
    side = 2048
    image = np.zeros((side, side), np.uint8)
    labels = np.zeros((side, side), np.int32)
    y = x = row_h = 0
    offset = 0
    for _, img, lab in images:
        h, w = lab.shape
        if x + w > side:
            y, x, row_h = y + row_h, 0, 0
        if y + h > side:
            continue
        image[y : y + h, x : x + w] = img
        labels[y : y + h, x : x + w] = np.where(lab > 0, lab + offset, 0)
        offset += int(lab.max())
        x, row_h = x + w, max(row_h, h)
    return _scene(image, labels, name)
