"""Writing a prepared dataset (layout in docs/ARCHITECTURE.md), byte-identical on re-runs.

Per split: ``images.npy`` (N,3,512,512) float32, ``labels.npy`` (N,1,512,512) int32,
``tiles.json``, ``coco.json`` (RLE masks), ``images.json`` (whole source images). JSON is
written with sorted keys and fixed separators; nothing depends on time or on dict order.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

CATEGORY = {"id": 1, "name": "cell", "supercategory": "cell"}


def write_json(path: Path, obj: Any, *, compact: bool = False) -> None:
    """Deterministic JSON: sorted keys, ASCII, fixed separators, trailing newline."""
    text = (
        json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        if compact
        else json.dumps(obj, sort_keys=True, ensure_ascii=True, indent=1)
    )
    path.write_text(text + "\n", encoding="utf-8")


def sha256_file(path: Path, *, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_arrays(split_dir: Path, n: int, tile: int) -> tuple[np.memmap, np.memmap]:
    """Create ``images.npy`` (n,3,tile,tile) float32 and ``labels.npy`` (n,1,tile,tile) int32
    as writable memory maps (zero-filled)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(
        split_dir / "images.npy", mode="w+", dtype=np.float32, shape=(n, 3, tile, tile)
    )
    labels = np.lib.format.open_memmap(
        split_dir / "labels.npy", mode="w+", dtype=np.int32, shape=(n, 1, tile, tile)
    )
    return images, labels


def coco_annotations(labels: np.ndarray, image_id: int, first_ann_id: int) -> list[dict[str, Any]]:
    """COCO annotations (RLE masks, xywh boxes, pixel areas) of one (H, W) label tile.

    Annotation ids are consecutive from ``first_ann_id``, in label order 1..n.
    """
    from pycocotools import mask as mask_utils
    from scipy import ndimage as ndi

    out: list[dict[str, Any]] = []
    h, w = labels.shape
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        m = np.zeros((h, w), np.uint8, order="F")
        m[sl] = labels[sl] == k
        rle = mask_utils.encode(m)
        out.append(
            {
                "id": first_ann_id + len(out),
                "image_id": image_id,
                "category_id": 1,
                "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                "area": int(m.sum()),
                "bbox": [
                    float(sl[1].start),
                    float(sl[0].start),
                    float(sl[1].stop - sl[1].start),
                    float(sl[0].stop - sl[0].start),
                ],
                "iscrowd": 0,
            }
        )
    return out


def coco_document(
    split: str, tiles: list[dict[str, Any]], annotations: list[dict[str, Any]], tile: int
) -> dict[str, Any]:
    """The COCO instances document of one split (image id = tile index in ``images.npy``)."""
    return {
        "info": {"description": f"cellsam prepared tiles, split {split}", "version": "1"},
        "categories": [CATEGORY],
        "images": [
            {
                "id": i,
                "file_name": f"{split}/images.npy#{i}",
                "height": tile,
                "width": tile,
                "source": t["source"],
                "source_image": t["image"],
                "y0": t["y0"],
                "x0": t["x0"],
            }
            for i, t in enumerate(tiles)
        ],
        "annotations": annotations,
    }


def checksums(out: Path, folders: list[str], files: list[str]) -> dict[str, str]:
    """sha256 of the given files and of every file in the given folders (relative to ``out``),
    keyed by posix path relative to ``out``."""
    paths = [out / f for f in files if (out / f).is_file()]
    for d in folders:
        paths.extend(p for p in (out / d).rglob("*") if p.is_file())
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(paths)}
