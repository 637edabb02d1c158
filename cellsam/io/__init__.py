"""Users' image files in, segmentation outputs out.

- :mod:`cellsam.io.read`: TIFF, PNG, JPEG, NPY and OME-Zarr readers (:func:`load_image`), the layout from
  the header before decoding (:func:`probe_image`), file discovery (:func:`find_images`).
- :mod:`cellsam.io.memory`: the memory in-memory segmentation needs, the pixel limit this machine allows.
- :mod:`cellsam.io.write`: label TIFF, outline overlay, per-cell CSV, COCO instances.
"""

from cellsam.io.memory import (
    FALLBACK_MAX_PIXELS,
    IN_MEMORY_BYTES_PER_PIXEL,
    MEMORY_MARGIN,
    available_memory_bytes,
    default_max_pixels,
    estimated_bytes,
)
from cellsam.io.read import (
    BLOCKWISE_SUFFIXES,
    IMAGE_SUFFIXES,
    ImageInfo,
    ImageReadError,
    ImageTooLarge,
    LoadedImage,
    check_image_size,
    find_images,
    image_name,
    load_image,
    probe_image,
    read_image,
)
from cellsam.io.write import (
    CSV_COLUMNS,
    cell_table,
    coco_dict,
    display_image,
    rgb_display,
    write_cells_csv,
    write_coco,
    write_labels,
    write_overlay,
)

__all__ = [
    "BLOCKWISE_SUFFIXES",
    "CSV_COLUMNS",
    "FALLBACK_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "IN_MEMORY_BYTES_PER_PIXEL",
    "MEMORY_MARGIN",
    "ImageInfo",
    "ImageReadError",
    "ImageTooLarge",
    "LoadedImage",
    "available_memory_bytes",
    "cell_table",
    "check_image_size",
    "coco_dict",
    "default_max_pixels",
    "display_image",
    "estimated_bytes",
    "find_images",
    "image_name",
    "load_image",
    "probe_image",
    "read_image",
    "rgb_display",
    "write_cells_csv",
    "write_coco",
    "write_labels",
    "write_overlay",
]
