"""npe2 reader: the files ``cellsam`` reads (TIFF, OME-Zarr, PNG / JPEG, NPY), through :mod:`cellsam.io`.

An image becomes one Image layer with its channels on one axis: an RGB PNG / JPEG is shown as RGB,
other channels are moved to the first axis (napari shows the last two axes as the picture), and
``metadata["cellsam"]["channel_axis"]`` says where they are when the file states it (the widget then
preselects it). A 2-D integer file named like a label image (``*_labels``, ``*_masks``, ...) becomes a
Labels layer. A large OME-Zarr (above :data:`LAZY_READ_PIXELS` pixels) is opened lazily as a multiscale
dask array, so nothing is read until it is shown or segmented block by block.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.io import IMAGE_SUFFIXES, ImageReadError, image_name, load_image

LABEL_SUFFIXES = ("_labels", "_label", "_masks", "_mask", "_cp_masks")
LAZY_READ_PIXELS = 16_000_000
LayerData = tuple[Any, dict[str, Any], str]


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """The reader for ``path`` (napari's ``get_reader`` contract: None when we do not read it)."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or any(Path(p).suffix.lower() not in IMAGE_SUFFIXES for p in paths):
        return None
    return read


def read(path: str | list[str]) -> list[LayerData]:
    """Layer data for each file. Raises :class:`cellsam.io.ImageReadError` with the reason."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    return [_read_one(Path(p)) for p in paths]


def _is_label_name(path: Path) -> bool:
    return image_name(path).lower().endswith(LABEL_SUFFIXES)


def _read_one(path: Path) -> LayerData:
    name = image_name(path)
    if path.suffix.lower() == ".zarr":
        lazy = _lazy_ome_zarr(path)
        if lazy is not None:
            return lazy
    loaded = load_image(path)
    data, axis = loaded.data, loaded.channel_axis
    meta = {"cellsam": {"path": str(path), "channel_axis": axis}}
    if data.ndim == 2 and np.issubdtype(data.dtype, np.integer) and _is_label_name(path):
        return data, {"name": name, "metadata": meta}, "labels"
    rgb = data.ndim == 3 and axis is not None and axis % 3 == 2 and data.shape[-1] in (3, 4)
    if data.ndim == 3 and axis is not None and not rgb and axis % 3 != 0:  # napari shows the last two axes
        data, meta["cellsam"]["channel_axis"] = np.moveaxis(data, axis, 0), 0
    return data, {"name": name, "metadata": meta, "rgb": rgb}, "image"


def _lazy_ome_zarr(path: Path) -> LayerData | None:
    """A multiscale OME-Zarr above LAZY_READ_PIXELS as a list of lazy dask levels (singleton axes
    dropped, as :mod:`cellsam.io` drops them), or None to read it whole."""
    import zarr

    try:
        group = zarr.open(str(path), mode="r")
        attrs = dict(getattr(group, "attrs", {}))
        ms = attrs["multiscales"][0]
        axes = "".join((a["name"] if isinstance(a, dict) else a)[0] for a in ms.get("axes", [])).upper()
        arrays = [group[d["path"]] for d in ms["datasets"]]
    except Exception:  # noqa: BLE001 - not a multiscale OME-Zarr: cellsam.io reads it (or says why not)
        return None
    first = arrays[0]
    if len(axes) != first.ndim or "Y" not in axes or "X" not in axes:
        return None
    h, w = first.shape[axes.index("Y")], first.shape[axes.index("X")]
    if h * w <= LAZY_READ_PIXELS:
        return None
    import dask.array as da

    keep = [i for i, a in enumerate(axes) if a in "YX" or first.shape[i] > 1]
    kept = "".join(axes[i] for i in keep)
    if sum(a not in "YX" for a in kept) > 1 or any(a not in "YXC" for a in kept):
        raise ImageReadError(f"{path}: axes {kept} are not a 2-D image (with channels)")
    index = tuple(slice(None) if i in keep else 0 for i in range(first.ndim))
    levels = [da.from_zarr(a)[index] for a in arrays]
    axis = kept.index("C") if "C" in kept else None
    meta = {"cellsam": {"path": str(path), "channel_axis": axis}}
    return levels, {"name": image_name(path), "metadata": meta, "multiscale": True}, "image"
