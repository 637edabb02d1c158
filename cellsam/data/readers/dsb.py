"""The 2018 Data Science Bowl layout: ``<id>/images/<id>.png`` + ``<id>/masks/*.png``.

Each mask PNG is one object (nonzero = inside). Overlaps (rare) are resolved with
:func:`cellsam.data.labels.masks_to_labels`. RGBA images lose alpha, then follow the RGB rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cellsam.data.labels import masks_to_labels
from cellsam.data.normalize import StainGrey
from cellsam.data.sample import IMAGE_EXTS, Sample, SampleError, check_labels, image_to_channels, load_array


def find_samples(root: Path) -> list[Path]:
    """Sample folders (those with ``images/`` and ``masks/`` sub-folders), sorted."""
    return sorted(d for d in root.iterdir() if (d / "images").is_dir() and (d / "masks").is_dir())


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def read_dsb(root: Path, *, stain: StainGrey = "luminance") -> Iterator[Sample | SampleError]:
    """Yield one :class:`Sample` per sample folder."""
    root = Path(root)
    folders = find_samples(root)
    if not folders:
        yield SampleError(root, "no '<id>/images' + '<id>/masks' folders found (DSB layout)")
        return
    for d in folders:
        imgs = _images(d / "images")
        if len(imgs) != 1:
            yield SampleError(d / "images", f"expected exactly one image, found {len(imgs)}")
            continue
        mask_files = _images(d / "masks")
        if not mask_files:
            yield SampleError(d / "masks", "no mask files")
            continue
        try:
            image = image_to_channels(load_array(imgs[0]), imgs[0], stain)
            masks = []
            for m in mask_files:
                arr = load_array(m)
                if arr.ndim == 3:
                    arr = arr[..., 0]
                if arr.shape != image.shape[-2:]:
                    raise SampleError(
                        m, f"mask size {arr.shape} does not match image size {image.shape[-2:]}"
                    )
                masks.append(arr > 0)
            labels, _ = masks_to_labels(masks)
            labels = check_labels(labels, d / "masks", image.shape[-2:])
        except SampleError as e:
            yield e
            continue
        yield Sample(
            image=image,
            labels=labels,
            roles=("whole-cell",),
            source=root.name,
            image_id=d.name,
            path=imgs[0].relative_to(root.parent).as_posix(),
            files={"image": str(imgs[0]), "labels": str(d / "masks")},
        )
