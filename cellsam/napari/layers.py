"""Between napari layers and the library: what a layer means for cellsam, what a result becomes as
layers. Plain functions over layer objects and arrays; no Qt.

Conventions: an image layer's last two non-channel axes are its pixels (y, x); its channel axis is
given by the user (or by the reader's ``metadata["cellsam"]["channel_axis"]``; an RGB layer's is -1).
Output layers (Labels, the boxes Shapes layer, the prompt layers) are 2-D with the image's (y, x)
scale and translate, so their data coordinates are the image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cellsam.napari.finetuning import TrainingImage
from cellsam.napari.segmentation import Channels, ImageSpec, level0

META = "cellsam"  # key of our entry in a layer's metadata
AUTO, NONE = "auto", "none"
AXIS_CHOICES = {"none (2-D)": None, "first (C, Y, X)": 0, "last (Y, X, C)": -1}


def default_axis(layer: Any) -> int | None:
    """The channel axis to preselect: the reader's, -1 for RGB layers, None for 2-D, else 0."""
    meta = dict(getattr(layer, "metadata", {}) or {}).get(META, {})
    if "channel_axis" in meta and meta["channel_axis"] is not None:
        return int(meta["channel_axis"])
    if getattr(layer, "rgb", False):
        return -1
    return None if len(level0(layer.data).shape) == 2 else 0


def spatial_shape(shape: Sequence[int], channel_axis: int | None) -> tuple[int, int]:
    """(H, W) of an array read with ``channel_axis``."""
    dims = [int(s) for i, s in enumerate(shape) if channel_axis is None or i != channel_axis % len(shape)]
    if len(dims) != 2:
        raise ValueError(
            f"the image has shape {tuple(shape)}: choose its channel axis (a 2-D image, or 3-D with channels)"
        )
    return dims[0], dims[1]


def parse_channels(nuclear: str, wholecell: str, n: int) -> Channels | None:
    """``channels=`` from the two choices ("auto", "none" or an index); None = the default rules."""
    if nuclear == AUTO and wholecell == AUTO:
        return None
    nuc, whole = (None if v in (AUTO, NONE) else int(v) for v in (nuclear, wholecell))
    picks = (nuc, whole)
    if picks == (None, None):
        raise ValueError("choose a nuclear or a whole-cell channel (or leave both on auto)")
    for v in picks:
        if v is not None and not 0 <= v < n:
            raise ValueError(f"channel {v} does not exist: the image has {n} channel(s)")
    return picks


def spatial_transform(layer: Any, channel_axis: int | None) -> dict[str, Any]:
    """``scale`` / ``translate`` of the image's (y, x) axes, for the 2-D layers made from it."""
    keep = [i for i in range(layer.ndim) if layer.rgb or channel_axis is None or i != channel_axis % layer.ndim]
    keep = keep[-2:]
    return {"scale": tuple(layer.scale[i] for i in keep), "translate": tuple(layer.translate[i] for i in keep)}


def labels_kwargs(image_layer: Any, spec: ImageSpec) -> dict[str, Any]:
    """kwargs of the Labels layer made for ``image_layer`` (name, transform, what it came from)."""
    return {
        "name": f"{image_layer.name} labels",
        "metadata": {META: {"image": image_layer.name, "channel_axis": spec.channel_axis,
                            "channels": spec.channels}},
        **spatial_transform(image_layer, spec.channel_axis),
    }


def box_rectangles(boxes: np.ndarray) -> list[np.ndarray]:
    """(N, 4) xyxy boxes -> napari rectangles, four (y, x) corners each."""
    return [np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], np.float32) for x0, y0, x1, y1 in boxes]


def boxes_kwargs(image_layer: Any, spec: ImageSpec, scores: np.ndarray) -> dict[str, Any]:
    """kwargs of the Shapes layer of detector boxes: label and score per box, the score as text."""
    n = len(scores)
    return {
        "name": f"{image_layer.name} boxes",
        "shape_type": "rectangle",
        "edge_color": "yellow",
        "face_color": "transparent",
        "edge_width": 1,
        "features": {"label": np.arange(1, n + 1), "score": np.round(np.asarray(scores, float), 3)},
        "text": {"string": "{score:.2f}", "size": 7, "color": "yellow", "anchor": "upper_left"},
        **spatial_transform(image_layer, spec.channel_axis),
    }


def box_of(vertices: np.ndarray) -> tuple[float, float, float, float]:
    """A shape's (y, x) vertices -> its bounding box (x0, y0, x1, y1) in pixels."""
    v = np.asarray(vertices, float)[:, -2:]
    return float(v[:, 1].min()), float(v[:, 0].min()), float(v[:, 1].max()), float(v[:, 0].max())


def click_prompt(
    points: np.ndarray, positive: Sequence[bool] | np.ndarray
) -> tuple[list[tuple[float, float]], list[int]]:
    """Points layer data ((y, x) rows) and their signs -> ((x, y) clicks, labels 1 / 0)."""
    pts = np.asarray(points, float).reshape(-1, points.shape[-1] if len(points) else 2)[:, -2:]
    return [(float(x), float(y)) for y, x in pts], [1 if p else 0 for p in positive]


def training_images(layers: Sequence[Any]) -> list[TrainingImage]:
    """The corrected label layers of open images: Labels layers this plugin made (their metadata names
    the image layer and how it was read) whose image layer is still open and that hold cells."""
    by_name = {layer.name: layer for layer in layers}
    out = []
    for layer in layers:
        meta = dict(getattr(layer, "metadata", {}) or {}).get(META, {})
        if type(layer).__name__ != "Labels" or "image" not in meta:
            continue
        image = by_name.get(meta["image"])
        labels = np.asarray(layer.data)
        if image is None or labels.max(initial=0) == 0:
            continue
        ch = meta.get("channels")
        out.append(TrainingImage(image.name, level0(image.data), meta.get("channel_axis"),
                                 None if ch is None else tuple(ch), labels))
    return out
