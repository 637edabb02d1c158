"""Image + label-image pairs, the Cellpose convention: ``<name>_img.<ext>`` + ``<name>_masks.<ext>``.

Any of TIFF / PNG / JPEG / BMP / NPY for either file; searched recursively. RGB images become
one channel (see :func:`cellsam.data.normalize.rgb_to_channel`); a 2-channel image stored
(2, H, W) is read as (nuclear, whole-cell).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cellsam.data.normalize import StainGrey
from cellsam.data.sample import (
    IMAGE_EXTS,
    Role,
    Sample,
    SampleError,
    check_labels,
    image_to_channels,
    load_array,
)

IMG_TAG = "_img"
MASK_TAG = "_masks"


def _files_with_tag(root: Path, tag: str) -> list[Path]:
    return sorted(
        p for p in root.rglob(f"*{tag}.*") if p.suffix.lower() in IMAGE_EXTS and p.stem.endswith(tag)
    )


def find_pairs(root: Path) -> list[Path]:
    """Image files ``*_img.*`` under ``root`` (sorted)."""
    return _files_with_tag(root, IMG_TAG)


def read_pairs(root: Path, *, stain: StainGrey = "luminance") -> Iterator[Sample | SampleError]:
    """Yield one :class:`Sample` per ``*_img.*`` file (or a :class:`SampleError` for a bad one)."""
    root = Path(root)
    images = find_pairs(root)
    if not images:
        yield SampleError(root, "no '*_img.*' images found (pairs layout)")
        return
    for img_path in images:
        name = img_path.stem[: -len(IMG_TAG)]
        masks = sorted(
            p for p in img_path.parent.glob(f"{name}{MASK_TAG}.*") if p.suffix.lower() in IMAGE_EXTS
        )
        if not masks:
            yield SampleError(img_path, f"no label image '{name}{MASK_TAG}.*' next to it")
            continue
        roles: tuple[Role, ...]
        try:
            arr = load_array(img_path)
            if arr.ndim == 3 and arr.shape[0] == 2:  # (nuclear, whole-cell) stack
                image, roles = arr, ("nuclear", "whole-cell")
            else:
                image, roles = image_to_channels(arr, img_path, stain), ("whole-cell",)
            labels = check_labels(load_array(masks[0]), masks[0], image.shape[-2:])
        except SampleError as e:
            yield e
            continue
        rel = img_path.relative_to(root.parent).as_posix()
        yield Sample(
            image=image,
            labels=labels,
            roles=roles,
            source=root.name,
            image_id=img_path.relative_to(root).as_posix()[: -len(img_path.suffix)][: -len(IMG_TAG)],
            path=rel,
            files={"image": str(img_path), "labels": str(masks[0])},
        )
