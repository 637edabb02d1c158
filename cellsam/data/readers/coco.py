"""COCO instance-segmentation JSON (polygons, uncompressed or compressed RLE), e.g. LIVECell.

Image files are looked up by ``file_name`` relative to the JSON's folder, then in its
``images/`` sub-folder. Overlapping instances are resolved as Cellpose does for LIVECell
(:func:`cellsam.data.labels.masks_to_labels`). ``iscrowd`` annotations are skipped. The split
comes from the JSON file name when it contains ``train``, ``val`` or ``test``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.data.labels import masks_to_labels
from cellsam.data.normalize import StainGrey
from cellsam.data.readers.npz import split_from_name
from cellsam.data.sample import Sample, SampleError, check_labels, image_to_channels, load_array


def find_files(root: Path) -> list[Path]:
    """COCO JSON files: ``root`` itself or ``*.json`` under it that have ``annotations``."""
    root = Path(root)
    if root.is_file():
        return [root]
    out = []
    for p in sorted(root.rglob("*.json")):
        try:
            with open(p, encoding="utf-8") as fh:
                head = fh.read(1 << 20)
        except OSError:
            continue
        if '"annotations"' in head or '"images"' in head:
            out.append(p)
    return out


def decode_segmentation(segm: Any, h: int, w: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, or RLE dict) -> (h, w) bool mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        if not segm:
            return np.zeros((h, w), bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
    elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, h, w)
    elif isinstance(segm, dict):
        rle = dict(segm)
        if isinstance(rle["counts"], str):
            rle["counts"] = rle["counts"].encode("ascii")
    else:
        raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")
    return mask_utils.decode(rle).astype(bool)


def _image_path(json_path: Path, file_name: str) -> Path:
    for cand in (json_path.parent / file_name, json_path.parent / "images" / file_name):
        if cand.is_file():
            return cand
    return json_path.parent / file_name


def read_coco(root: Path, *, stain: StainGrey = "luminance") -> Iterator[Sample | SampleError]:
    """Yield one :class:`Sample` per image with at least one annotation."""
    root = Path(root)
    files = find_files(root)
    if not files:
        yield SampleError(root, "no COCO .json files found")
        return
    base = root.parent
    for jf in files:
        try:
            with open(jf, encoding="utf-8") as fh:
                data = json.load(fh)
            images = {int(im["id"]): im for im in data["images"]}
            anns = defaultdict(list)
            for a in data.get("annotations", []):
                if not a.get("iscrowd", 0):
                    anns[int(a["image_id"])].append(a)
        except (OSError, ValueError, KeyError, TypeError) as e:
            yield SampleError(jf, f"not a readable COCO instances file ({type(e).__name__}: {e})")
            continue
        split = split_from_name(jf.stem)
        for img_id in sorted(images, key=lambda i: str(images[i].get("file_name", i))):
            info = images[img_id]
            if not anns[img_id]:
                continue
            path = _image_path(jf, str(info.get("file_name", "")))
            try:
                image = image_to_channels(load_array(path), path, stain)
                h, w = image.shape[-2:]
                if (int(info.get("height", h)), int(info.get("width", w))) != (h, w):
                    raise SampleError(
                        path,
                        f"image size {(h, w)} differs from the JSON's "
                        f"{(info.get('height'), info.get('width'))}",
                    )
                masks = [decode_segmentation(a["segmentation"], h, w) for a in anns[img_id]]
                labels, _ = masks_to_labels(masks)
                labels = check_labels(labels, path, (h, w))
            except SampleError as e:
                yield e
                continue
            except (KeyError, ValueError, TypeError) as e:
                yield SampleError(path, f"bad annotation ({type(e).__name__}: {e})")
                continue
            rel = path.relative_to(base).as_posix() if path.is_relative_to(base) else path.name
            yield Sample(
                image=image,
                labels=labels,
                roles=("whole-cell",),
                source=root.stem if root.is_file() else root.name,
                image_id=rel,
                path=rel,
                files={"image": str(path), "labels": f"{jf}#{img_id}"},
                split=split,
            )
