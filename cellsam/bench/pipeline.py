"""Our pipeline, timed stage by stage, on synthetic scenes with a chosen number of cells.

What is timed is the real code path of ``cellsam segment``: the image file is read with
:func:`cellsam.io.load_image`, normalised with :func:`~cellsam.inference.preprocess.prepare_image`,
and segmented by :func:`cellsam.inference.segment.segment_prepared`. The stages inside
``segment_prepared`` are measured from outside: the model is wrapped in a timing proxy and the
module-level helpers of :mod:`cellsam.inference.segment` are temporarily replaced by timed versions
(restored afterwards). Stages (exclusive wall time, summed over tiles):

    read          image file -> array
    normalise     percentile clip + CLAHE -> (3, H, W) in [0, 1]
    tiling        tile extraction (extract_tile)
    encoder       pixel normalisation + ONE ViT pass per tile batch (model.preprocess + model.encode)
    cellfinder    Anchor-DETR on the trunk + box post-processing (model.detect + postprocess_detections)
    mask_decoder  prompt encoder + mask decoder, batched over boxes (model.decode)
    postprocess   per-cell logit upscaling on the cell's window + threshold / largest island / fill holes
                  (upscale_cells, _crop_cell)
    stitching     removal of copies of a cell from overlapping tiles (deduplicate)
    merge         label image by arg-max + label cleaning (merge_by_argmax, clean_labels)
    other         end to end minus the stages above (resizing tiles, tensor copies, Python glue)

The number of cells is controlled by *supplying boxes*: the detector still runs (and is timed), but
its detections are replaced by the scene's boxes of the cells whose centre lies in each tile, so the
mask decoder and everything after it see exactly N cells whatever the weights. With random weights
the decoder's masks have arbitrary extent; ``clip_masks=True`` sets the low-resolution logits outside
each box (plus one low-res pixel) to -20 so that masks, and the cost of post-processing them, have
the size of real cells. The same clipping is applied in the reference pipeline (:mod:`.reference`).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellsam.bench.timing import PeakMemory, StageTimer, merge_peaks, summarize, synchronize
from cellsam.config import DEFAULT_DECODE_WINDOW, FlipTest
from cellsam.inference.params import SegmentParams
from cellsam.inference.runtime import autocast_context
from cellsam.models.protocol import model_tile_size

AREA_UNIT = 512 * 512  # "cells" are given per 512 x 512 pixels
STAGES = ("read", "normalise", "scale", "tiling", "encoder", "cellfinder", "mask_decoder", "postprocess",
          "stitching", "merge")
CLIP_LOGIT = -20.0
_SEGMENT_HELPERS = {  # name in cellsam.inference.segment -> stage
    "extract_tile": "tiling",
    "upscale_cells": "postprocess",
    "_crop_cell": "postprocess",
    "deduplicate": "stitching",
    "merge_by_argmax": "merge",
    "clean_labels": "merge",
}


# ---------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Scene:
    """A fluorescence image with known cells: synthetic disks, or real nuclei (:mod:`cellsam.bench.real`).

    Attributes:
        image: (H, W) uint16, bright cells on a dark background.
        labels: (H, W) int32, 0 background, 1..N cells; None unless asked for (it costs 4 bytes a pixel).
        boxes: (N, 4) float32 xyxy pixel boxes of the cells (exclusive right/bottom edge).
        cells: density, cells per 512 x 512 pixels (requested for synthetic scenes).
        name: "synthetic", or the real scene's name.
    """

    image: np.ndarray
    labels: np.ndarray | None
    boxes: np.ndarray
    cells: int
    name: str = "synthetic"

    @property
    def n_cells(self) -> int:
        return int(self.boxes.shape[0])


def synthetic_scene(size: int | tuple[int, int], *, cells: int, seed: int = 0, keep_labels: bool = True) -> Scene:
    """Disks on a jittered grid: ``round(cells * H * W / 512**2)`` non-touching cells (at least 1).

    Args:
        size: side of a square image, or (H, W); each side >= 16.
        cells: density in cells per 512 x 512 pixels (>= 1).
        keep_labels: keep the label image in the scene (needed by Cellpose's mask-building step).
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if min(h, w) < 16:
        raise ValueError(f"image sides must be >= 16, got {(h, w)}")
    if not isinstance(cells, (int, np.integer)) or cells < 1:
        raise ValueError(f"cells must be a positive integer, got {cells!r}")
    n = max(1, int(round(cells * h * w / AREA_UNIT)))
    rng = np.random.default_rng(seed)
    pitch = float(np.sqrt(h * w / n))
    while (h // max(int(pitch), 1)) * (w // max(int(pitch), 1)) < n:
        pitch *= 0.97
    step = max(int(pitch), 4)
    ny, nx = h // step, w // step
    if ny * nx < n:
        raise ValueError(f"{n} cells do not fit in a {h}x{w} image; lower --cells")
    slots = rng.choice(ny * nx, size=n, replace=False)
    radius = max(1.5, 0.33 * step)
    labels = np.zeros((h, w), np.int32)
    boxes = np.zeros((n, 4), np.float32)
    for k, slot in enumerate(np.sort(slots)):
        r = radius * float(rng.uniform(0.8, 1.0))
        jitter = max(step / 2 - r - 1, 0.0)
        cy = (slot // nx) * step + step / 2 + rng.uniform(-jitter, jitter)
        cx = (slot % nx) * step + step / 2 + rng.uniform(-jitter, jitter)
        y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, h)
        x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, w)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disk = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= r * r
        labels[y0:y1, x0:x1][disk] = k + 1
        ys, xs = np.nonzero(disk)
        boxes[k] = (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1)
    bright = rng.uniform(0.8, 1.2, n + 1).astype(np.float32)
    bright[0] = 0.0
    signal = 200.0 + 2000.0 * bright[labels] + rng.normal(0.0, 60.0, (h, w)).astype(np.float32)
    image = np.clip(signal, 0, 65535).astype(np.uint16)
    del signal
    return Scene(image=image, labels=labels if keep_labels else None, boxes=boxes, cells=int(cells))


def write_scene(scene: Scene, folder: str | Path, name: str = "scene") -> Path:
    """Write ``scene.image`` as ``folder/name.tif`` (read back in the "read" stage)."""
    import tifffile

    path = Path(folder) / f"{name}.tif"
    tifffile.imwrite(path, scene.image)
    return path


# ---------------------------------------------------------------------------------------------- boxes
class BoxOracle:
    """The scene's boxes, per tile, in pixels of the model input (replaces CellFinder's detections).

    Tiles are recorded in the order ``extract_tile`` is called; each call of
    :meth:`detections` consumes the recorded tiles of one encoder batch.
    """

    def __init__(self, boxes: np.ndarray, *, tile_size: int, model_side: int) -> None:
        self.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        self.centres = (self.boxes[:, :2] + self.boxes[:, 2:]) / 2
        self.tile_size, self.model_side = int(tile_size), int(model_side)
        self.pending: list[Any] = []

    def record(self, tile: Any) -> None:
        self.pending.append(tile)

    def tile_boxes(self, tile: Any) -> np.ndarray:
        """(n, 4) xyxy boxes of the cells whose centre is in ``tile``, in model-input pixels."""
        cy, cx = self.centres[:, 1], self.centres[:, 0]
        inside = (cy >= tile.y0) & (cy < tile.y1) & (cx >= tile.x0) & (cx < tile.x1)
        b = self.boxes[inside] - np.array([tile.x0, tile.y0, tile.x0, tile.y0], np.float32)
        b = np.clip(b, 0, self.tile_size)
        return b * (self.model_side / self.tile_size)

    def detections(self, n_images: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        if len(self.pending) != n_images:
            raise RuntimeError(
                f"box oracle: {len(self.pending)} tiles were extracted for a batch of {n_images} images; "
                "segment_prepared no longer calls extract_tile once per tile before detection"
            )
        out = []
        for tile in self.pending:
            b = torch.from_numpy(self.tile_boxes(tile)).to(device)
            scores = torch.linspace(1.0, 0.5, b.shape[0], device=device) if b.shape[0] else b.new_zeros(0)
            out.append({"boxes": b, "scores": scores, "labels": torch.zeros(b.shape[0], dtype=torch.long,
                                                                           device=device)})
        self.pending = []
        return out


def clip_logits_to_boxes(low_res: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """Set logits outside each box (grown by one low-res pixel) to ``CLIP_LOGIT``.

    Args:
        low_res: (N, M, r, r) mask logits covering the S x S model input.
        boxes: (N, 4) xyxy in pixels of S. side: S.
    Returns:
        (N, M, r, r) logits.
    """
    n, r = low_res.shape[0], low_res.shape[-1]
    if n == 0:
        return low_res
    b = boxes.to(device=low_res.device, dtype=torch.float32) * (r / side)
    grid = torch.arange(r, device=low_res.device, dtype=torch.float32) + 0.5
    in_x = (grid[None] >= b[:, 0:1] - 1) & (grid[None] < b[:, 2:3] + 1)  # (N, r)
    in_y = (grid[None] >= b[:, 1:2] - 1) & (grid[None] < b[:, 3:4] + 1)
    inside = in_y[:, :, None] & in_x[:, None, :]  # (N, r, r)
    return low_res.masked_fill(~inside[:, None], CLIP_LOGIT)


# ---------------------------------------------------------------------------------------------- timed model
class TimedModel:
    """A proxy of a CellSAM model whose stage methods are timed; other attributes pass through."""

    def __init__(self, net: Any, timer: StageTimer, oracle: BoxOracle | None, *, clip_masks: bool) -> None:
        self._net, self._timer, self._oracle, self._clip = net, timer, oracle, clip_masks
        self.boxes_decoded = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._net, name)

    @property
    def img_size(self) -> int:
        return int(self._net.img_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        with self._timer.stage("encoder"):
            return self._net.preprocess(images)

    def predict_diameter(self, images: torch.Tensor) -> torch.Tensor:
        with self._timer.stage("scale"):
            return self._net.predict_diameter(images)

    def encode(self, images: torch.Tensor) -> Any:
        with self._timer.stage("encoder"):
            return self._net.encode(images)

    def detect(self, enc: Any, images: torch.Tensor | None = None, *,
               flip_test: FlipTest | bool | None = None) -> dict[str, Any]:
        with self._timer.stage("cellfinder"):  # with the flip test, its mirrored trunk passes too
            return self._net.detect(enc, images, flip_test=flip_test)

    def postprocess_detections(self, outputs: dict[str, Any], *, box_threshold: float) -> list[dict]:
        with self._timer.stage("cellfinder"):
            dets = self._net.postprocess_detections(outputs, box_threshold=box_threshold)
            if self._oracle is not None:
                dev = dets[0]["boxes"].device if dets else torch.device("cpu")
                dets = self._oracle.detections(len(dets), dev)
            return dets

    def decode(self, embedding: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with self._timer.stage("mask_decoder"):
            lo, iou = self._net.decode(embedding, **kwargs)
            self.boxes_decoded += int(lo.shape[0])
            if self._clip and kwargs.get("boxes") is not None:
                lo = clip_logits_to_boxes(lo, kwargs["boxes"], self.img_size)
            return lo, iou



@contextlib.contextmanager
def instrument_segment(timer: StageTimer, oracle: BoxOracle | None) -> Iterator[list[str]]:
    """Replace the helpers of :mod:`cellsam.inference.segment` by timed versions; yields the names found.

    Helpers missing from the module (renamed by a later refactor) are skipped: their time then shows
    up under "other".
    """
    import cellsam.inference.segment as seg

    saved: dict[str, Any] = {}
    try:
        for name, stage in _SEGMENT_HELPERS.items():
            fn = getattr(seg, name, None)
            if fn is None:
                continue
            saved[name] = fn
            timed = timer.wrap(stage, fn)
            if name == "extract_tile" and oracle is not None:
                timed = _recording(timed, oracle)
            setattr(seg, name, timed)
        yield sorted(saved)
    finally:
        for name, fn in saved.items():
            setattr(seg, name, fn)


def _recording(fn: Any, oracle: BoxOracle) -> Any:
    def extract(image: np.ndarray, tile: Any, tile_size: int) -> np.ndarray:
        oracle.record(tile)
        return fn(image, tile, tile_size)

    return extract


# ---------------------------------------------------------------------------------------------- runs
IOU_KEEP_ALL = -float(np.finfo(np.float32).max)
"""An IoU threshold that every finite predicted IoU passes (untrained heads predict any value)."""


def _segment_params(net: Any, *, batch_size: int, decode_chunk: int | None,
                    decode_window: float | None) -> SegmentParams:
    """Fixed thresholds that keep every decoded mask (the lowest finite IoU threshold), the model's tile size."""
    return SegmentParams(
        box_threshold=0.4, box_threshold_rel=0.0, iou_threshold=IOU_KEEP_ALL, mask_threshold=0.5, min_area=15,
        tile_size=model_tile_size(net), tile_overlap=0.25, batch_size=batch_size, decode_chunk=decode_chunk,
        decode_window=decode_window, filled=True,
    )


def _run_params(net: Any, scene: Scene, *, own_boxes: bool, diameter: float | str | None, batch_size: int,
                decode_chunk: int | None, decode_window: float | None) -> tuple[SegmentParams, BoxOracle | None]:
    """The parameters of a timed run, and the box oracle of a synthetic scene (None with the model's boxes)."""
    params = _segment_params(net, batch_size=batch_size, decode_chunk=decode_chunk, decode_window=decode_window)
    if own_boxes:
        inf = net.cfg.inference
        return params.replace(box_threshold=inf.box_threshold, iou_threshold=inf.iou_threshold,
                              mask_threshold=inf.mask_threshold, diameter=diameter), None
    if diameter is not None:
        raise ValueError("diameter: only with the model's own boxes (real scenes)")
    params = params.replace(diameter=None)  # synthetic scenes: the scene's boxes at the model's scale
    return params, BoxOracle(scene.boxes, tile_size=params.model_values().tile_size, model_side=int(net.img_size))


def time_pipeline(
    net: Any,
    scene: Scene,
    *,
    image_path: str | Path | None = None,
    precision: str = "fp32",
    repeats: int = 3,
    warmup: int = 1,
    batch_size: int = 4,
    decode_chunk: int | None = None,
    decode_window: float | None = DEFAULT_DECODE_WINDOW,
    clip_masks: bool = True,
    model_name: str = "",
    own_boxes: bool = False,
    diameter: float | str | None = None,
) -> dict[str, Any]:
    """Time our pipeline end to end and per stage on ``scene`` (``repeats`` timed runs after ``warmup``).

    Args:
        net: a CellSAM model (eval mode, on its device).
        image_path: the scene written as an image file (a temporary TIFF when None).
        precision: "fp32" or "bf16" (autocast around the whole segmentation).
        decode_window: :func:`cellsam.segment`'s ``decode_window`` (None or 0: whole frames).
        own_boxes: the model's own CellFinder and stored thresholds (real images) instead of the
            scene's boxes at fixed thresholds (synthetic scenes, random weights).
        diameter: :func:`cellsam.segment`'s ``diameter`` (own_boxes only): "auto" adds the size model's
            pass (timed as the stage ``scale``) and, when the cells are far from the model's size, the
            segmentation at their scale.
    Returns:
        a run record (see ``benchmarks/README.md``): end_to_end and per-stage statistics in seconds,
        peak memory, tiles, throughput, cells found.
    """
    from cellsam.inference.preprocess import prepare_image, stain_grey
    from cellsam.inference.segment import segment_at_scale
    from cellsam.io import load_image

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    dev = next(net.parameters()).device
    params, oracle = _run_params(net, scene, own_boxes=own_boxes, diameter=diameter, batch_size=batch_size,
                                 decode_chunk=decode_chunk, decode_window=decode_window)
    timer, mem = StageTimer(dev), PeakMemory(dev)
    proxy = TimedModel(net, timer, oracle, clip_masks=clip_masks)
    with contextlib.ExitStack() as stack:
        if image_path is None:
            image_path = write_scene(scene, stack.enter_context(tempfile.TemporaryDirectory()))
        e2e, stages, mems, found, tiles, decoded = [], [], [], 0, 0, 0
        for i in range(warmup + repeats):
            timer.reset()
            mem.reset()
            proxy.boxes_decoded = 0
            synchronize(dev)
            t0 = time.perf_counter()
            with timer.stage("read"):
                raw = load_image(image_path).data
            with timer.stage("normalise"):
                img = prepare_image(raw, stain=stain_grey(net))
            with instrument_segment(timer, oracle), torch.inference_mode(), autocast_context(precision, dev):
                seg = segment_at_scale(img, proxy, dev, params)
            synchronize(dev)
            total = time.perf_counter() - t0
            if i < warmup:
                continue
            per = {s: timer.seconds.get(s, 0.0) for s in STAGES}
            per["other"] = max(total - sum(per.values()), 0.0)
            e2e.append(total)
            stages.append(per)
            mems.append(mem.peak())
            found, tiles, decoded = seg.n_cells, int(seg.stats.get("tiles", 0)), proxy.boxes_decoded
    med = float(np.median(e2e))
    h, w = scene.image.shape
    return {
        "pipeline": "cellsam",
        "model": model_name,
        "size": [int(h), int(w)],
        "cells": scene.cells,
        "n_cells": scene.n_cells,
        "scene": scene.name,
        "boxes": "model" if own_boxes else "scene",
        "precision": precision,
        "device": str(dev),
        "tile_size": params.tile_size,
        "model_side": int(net.img_size),
        "batch_size": int(batch_size),
        "decode_chunk": int(net.auto_chunk_size() if decode_chunk is None else decode_chunk),
        "decode_window": params.decode_window,
        "diameter": diameter,
        "diameter_used": seg.diameter,
        "tile_size_used": seg.tile_size,
        "clip_masks": bool(clip_masks),
        "repeats": int(repeats),
        "warmup": int(warmup),
        "tiles": tiles,
        "end_to_end": summarize(e2e),
        "stages": {s: summarize([p[s] for p in stages]) for s in (*STAGES, "other")},
        "stage_calls": dict(timer.calls),
        "memory": merge_peaks(mems),
        "tiles_per_s": tiles / med if med > 0 else float("nan"),
        "megapixels_per_s": h * w / 1e6 / med if med > 0 else float("nan"),
        "cells_found": int(found),
        "boxes_decoded": int(decoded),
    }

