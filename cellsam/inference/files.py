"""Image files in, label files out: what ``cellsam segment`` does per file, as a library function.

Per image ``<name>``: ``<name>_labels.tif`` (uint16, uint32 above 65535 cells), ``<name>_overlay.png`` (outlines
over the image), ``<name>_cells.csv`` and, with ``coco``, ``<name>_coco.json``. The command line and the Dask
file tasks (:mod:`cellsam.distributed.files`) both call :func:`segment_file`, so their outputs are the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cellsam.inference.params import SegmentParams

if TYPE_CHECKING:
    from cellsam.models.protocol import SegmentationModel

__all__ = ["FileOptions", "segment_file", "unique_name"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileOptions:
    """How a file is read and what is written besides the labels.

    Attributes:
        channel_axis: channel axis of 3-D images; None: the file's own (``cellsam.io.load_image``).
        channels: ``(nuclear_idx, wholecell_idx)``, either may be None; None: the default channel convention.
        coco: also write ``<name>_coco.json``.
        max_pixels: the largest image read into memory (read from the header first); None: what the
            available memory of the machine that runs :func:`segment_file` allows.
    """

    channel_axis: int | None = None
    channels: tuple[int | None, int | None] | None = None
    coco: bool = False
    max_pixels: int | None = None


def unique_name(path: Path, used: set[str]) -> str:
    """The output name of ``path`` (:func:`cellsam.io.image_name`), made unique among ``used`` (then added to
    it): the file's suffix, then ``_2``, ``_3``, ... are appended to a name already taken."""
    from cellsam.io import image_name

    name = image_name(path)
    if name in used:
        name = f"{name}_{path.suffix.lstrip('.').lower()}"
    k = 2
    base = name
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name


def segment_file(path: Path, outdir: Path, name: str, model: SegmentationModel, params: SegmentParams,
                 options: FileOptions = FileOptions()) -> int:  # noqa: B008 - frozen dataclass
    """Segment one file and write its outputs under ``outdir`` as ``<name>_*``; returns the number of cells.

    Raises on any error (``cellsam.io.ImageTooLarge`` above ``options.max_pixels``, before decoding).
    """
    import numpy as np

    from cellsam import io
    from cellsam.data.normalize import is_grey_rgb
    from cellsam.inference.preprocess import prepare_image, stain_grey
    from cellsam.inference.segment import segment

    limit = io.default_max_pixels() if options.max_pixels is None else int(options.max_pixels)
    loaded = io.load_image(path, max_pixels=limit)  # the size from the header, before decoding
    axis = options.channel_axis if options.channel_axis is not None else loaded.channel_axis
    channels = options.channels
    prepared = prepare_image(loaded.data, channel_axis=axis, channels=channels, stain=stain_grey(model))
    seg = segment(prepared, model, channel_axis=0, normalize=False, params=params)
    assert not isinstance(seg, list)  # one image in, one result out
    if seg.message:
        log.warning("%s: %s", path, seg.message)
    display = io.display_image(prepared)
    if channels is None and axis is not None and loaded.data.ndim == 3 and loaded.data.shape[axis] in (3, 4):
        rgb = np.moveaxis(loaded.data, axis, -1)
        if not is_grey_rgb(rgb):  # colour pictures (H&E) are shown as they are
            display = io.rgb_display(rgb)
    io.write_labels(outdir / f"{name}_labels.tif", seg.labels)
    io.write_overlay(outdir / f"{name}_overlay.png", display, seg.labels)
    io.write_cells_csv(outdir / f"{name}_cells.csv", io.cell_table(seg.labels, seg.scores, seg.ious))
    if options.coco:
        io.write_coco(outdir / f"{name}_coco.json", io.coco_dict(seg.labels, seg.scores, path.name))
    return seg.n_cells
