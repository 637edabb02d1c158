"""``cellsam.segment``: images in, one label image per image out.

Pipeline per image (all sizes in pixels of the input image unless said otherwise):

1. :func:`~cellsam.inference.preprocess.prepare_image`: validation, channel layout, normalisation
   -> (3, H, W) in [0, 1].
2. Tiles of ``tile_size`` (default: the model's ``cfg.tile_size``, 512 for the paper's ViT-B, 256 for
   our CPU model; 25% overlap; a smaller image is one zero-padded tile), each
   resized to the model's input side S (512 -> 1024 for ViT-B), ``batch_size`` tiles per encoder pass.
3. CellFinder boxes with score >= ``box_threshold``; a tile keeps the boxes centred in its core (the
   part of the image it holds farthest from its borders, :func:`~.tiling.tile_cores`), so a cell seen
   by overlapping tiles is decoded once; SAM masks decoded in chunks from the box prompts
   (``refine_boxes`` more rounds from each mask's own box when the model says so); masks whose
   predicted IoU < ``iou_threshold`` dropped; each cell's logits upscaled to tile pixels on its own
   window only (:mod:`.upscale`).
4. Per cell: binarise at sigmoid(logit) > ``mask_threshold``, keep the largest island, fill holes.
5. Stitching: cells scoring under ``box_threshold_rel`` x the 90th percentile of the image's cell scores
   are dropped (:func:`~.tiling.confident`); copies of one cell that remain (boxes near a core's edge)
   are removed (see :mod:`.tiling`).
6. One label image by arg-max over the cells' logits (a pixel goes to the cell with the highest
   logit among those whose mask contains it); each label keeps its largest component; cells under
   ``min_area`` pixels (default 15) or under ``min_area_rel`` (default 0.15) x the median area of the
   image's cells are dropped; labels renumbered 1..N by descending box score.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cellsam.config import AUTO, DEFAULT_DECODE_WINDOW, DEFAULT_DIAMETER, FlipTest
from cellsam.inference.params import DEFAULT_MIN_AREA, DEFAULT_MIN_AREA_REL, SegmentParams, params_or_keywords
from cellsam.inference.polarity import invert_whole_cell, prefers_inverted
from cellsam.inference.preprocess import Channels, as_numpy, prepare_image, stain_grey
from cellsam.inference.runtime import autocast_context, resolve_model
from cellsam.inference.scale import choose_scale, has_size_model, rescale_from_cells
from cellsam.inference.tiling import (
    Candidate,
    Tile,
    confident,
    deduplicate,
    extract_tile,
    in_core,
    tile_cores,
    tile_grid,
)
from cellsam.inference.upscale import upscale_cells
from cellsam.models.protocol import SegmentationModel, inference_defaults
from cellsam.ops.boxes import masks_to_boxes
from cellsam.ops.masks import CellMask, clean_cell_mask, clean_labels, logit_threshold, merge_by_argmax

__all__ = ["DEFAULT_MIN_AREA", "Segmentation", "SegmentParams", "segment", "segment_at_scale", "segment_prepared",
           "tile_candidates"]

log = logging.getLogger(__name__)


@dataclass
class Segmentation:
    """The result for one image.

    Attributes:
        labels: (H, W) int32, 0 = background, 1..N = cells (ordered by descending box score).
        boxes: (N, 4) float32 CellFinder boxes, xyxy in pixels of the input image; row k is label k+1.
        scores: (N,) float32 CellFinder box scores.
        ious: (N,) float32 predicted mask IoUs.
        masks: with ``return_masks=True``, the N per-cell masks before the arg-max merge (overlapping
            cells keep their full masks) as :class:`~cellsam.ops.masks.CellMask` crops; else None.
        message: why the result is empty (empty string when cells were found).
        stats: counts along the pipeline: tiles, boxes (above box_threshold, all tiles), decoded
            (boxes in their tile's core), iou_passed, masks (non-empty cleaned masks >= min_area),
            stitched (after removing copies).
        diameter: the cell diameter in image pixels that set the scale (given, or estimated with
            ``diameter="auto"``); None without ``diameter`` or when auto found no cell.
        tile_size: the input tile side the labels were made at (the scale: model tile = native).
        inverted: whether the model saw the whole-cell channel inverted (``polarity``, see :mod:`.polarity`).
    """

    labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    ious: np.ndarray
    masks: list[CellMask] | None = None
    message: str = ""
    stats: dict[str, int] = field(default_factory=dict)
    diameter: float | None = None
    tile_size: int | None = None
    inverted: bool = False

    @property
    def n_cells(self) -> int:
        return int(self.scores.shape[0])


def _image_list(image: Any, batch: bool) -> tuple[list[Any], bool]:
    """(images, single) from one image, a list/tuple of images, or a batch array (``batch=True``)."""
    if isinstance(image, (list, tuple)):
        if batch:
            raise ValueError("batch=True is for one array whose first axis indexes images, not for a list")
        if len(image) == 0:
            raise ValueError("got an empty list of images")
        return list(image), False
    if batch:
        arr = as_numpy(image)
        if arr.ndim < 3:
            raise ValueError(f"batch=True needs an array (B, ...) of images, got shape {arr.shape}")
        return list(arr), False
    return [image], True


def segment(
    image: Any,
    model: Any = "default",
    *,
    batch: bool = False,
    channel_axis: int | None = None,
    channels: Channels | None = None,
    normalize: bool = True,
    box_threshold: float | None = None,
    box_threshold_rel: float | None = None,
    iou_threshold: float | None = None,
    mask_threshold: float | None = None,
    min_area: int = DEFAULT_MIN_AREA,
    min_area_rel: float = DEFAULT_MIN_AREA_REL,
    tile_size: int | None = None,
    tile_overlap: float = 0.25,
    diameter: float | str | None = DEFAULT_DIAMETER,
    polarity: str = AUTO,
    batch_size: int = 4,
    decode_chunk: int | None = None,
    decode_copies: bool = False,
    decode_window: float | None = DEFAULT_DECODE_WINDOW,
    flip_test: FlipTest | bool | None = None,
    device: str | torch.device | None = None,
    return_masks: bool = False,
    progress: bool = False,
    precision: str = "fp32",
    params: SegmentParams | None = None,
) -> Segmentation | list[Segmentation]:
    """Segment every cell of one image or of several images.

    Args:
        image: (H, W), or 3-D with ``channel_axis``; or a list of such images; or with ``batch=True`` an
            array whose first axis indexes images. numpy arrays or torch tensors, any numeric dtype.
        model: a CellSAM model, or a name / checkpoint path for :func:`cellsam.weights.load_model`
            (``"default"``: the model shipped with the package).
        channel_axis: channel axis of each 3-D image (never guessed; see :mod:`.preprocess`).
        channels: ``(nuclear_idx, wholecell_idx)``, either may be None.
        normalize: False for images already normalised to CellSAM's (3, H, W) [0, 1] layout.
        box_threshold: minimum CellFinder box score.
        box_threshold_rel: also drop cells scoring under this times the 90th percentile of the image's
            cell scores (0: off; see :func:`~.tiling.confident`).
        iou_threshold: minimum predicted mask IoU (an uncalibrated regression output).
        mask_threshold: probability (after sigmoid) above which a pixel belongs to a cell.
            ``None`` (the default for these four) takes the model's own ``cfg.inference`` values
            (0.4 / 0 / 0.5 / 0.5, the paper's, unless the model was shipped with others).
        min_area: cells with fewer pixels in the final label image are dropped.
        min_area_rel: so are cells under this fraction of the median area of the image's cells (specks
            and fragments far smaller than its typical cell; 0: off).
        tile_size, tile_overlap: tiling in input pixels; each tile is resized to the model's input side.
            ``tile_size=None`` uses the model's own ``cfg.tile_size`` (the scale it was trained at).
        diameter: the typical cell diameter in pixels: the image is segmented at the scale where its
            cells have the model's own ``cfg.inference.cell_diameter`` (by the tile size, see
            :mod:`.scale`); ``"auto"`` (the default) estimates it with the model's size model (without one,
            from a first pass's cells) and rescales only when it is far from the model's; None: the
            image's own scale. A given ``tile_size`` replaces "auto"; a number with it is an error.
        polarity: "auto" (the default): an image whose whole-cell channel has a light background
            (phase contrast, bright field) is segmented with that channel inverted when the CellFinder is
            more confident so (dark bacteria in phase contrast; see :mod:`.polarity`); "as_is" or
            "inverted" fix the choice.
        batch_size: tiles per encoder pass. decode_chunk: box prompts per mask-decoder call (None: the
            model's :meth:`~cellsam.models.cellsam.CellSAM.auto_chunk_size` for its device).
        decode_copies: decode each box in every tile that detects it, not only in the tile whose core
            holds its centre; stitching then keeps one copy. About twice the mask-decoder work at
            25% overlap; a weak detector finds a few more cells this way (measured on our val split
            with the shipped model: 1,806 vs 1,578 cells, F1@0.5 mean 0.402 vs 0.395).
        decode_window: compute each box's mask on a square of decoder tokens ``decode_window`` x the
            box's longer side (see :meth:`~cellsam.models.cellsam.CellSAM.decode`); the values there
            are those of whole frames, so only a cell reaching farther than that from its box changes.
            None or 0: whole frames.
        flip_test: the dense CellFinder also looks at each tile mirrored and decodes the mean maps:
            ``"mirrors"`` (or True) left-right and up-down, two more trunk passes per tile; ``"rot180"`` both
            axes at once, one more pass; ``"off"`` (or False) the one view (see
            :meth:`~cellsam.models.cellsam.CellSAM.detect`); None: the model's ``cfg.inference.flip_test``.
        device: "cpu", "cuda", "mps", "auto"; None keeps a given model where it is ("auto" for names).
        return_masks: also return the per-cell masks before merging.
        progress: show a tqdm bar over the tiles of large images.
        precision: "fp32", or "bf16" to run the networks under bfloat16 autocast (faster on CPUs and
            GPUs with bf16 units; thresholds and merging stay in float32).
        params: all of the above (from ``box_threshold`` on) as one
            :class:`~cellsam.inference.params.SegmentParams`, instead of the keyword arguments.
    Returns:
        a :class:`Segmentation` for a single image, else a list of them.
    """
    params = params_or_keywords(
        params, box_threshold=box_threshold, box_threshold_rel=box_threshold_rel, iou_threshold=iou_threshold,
        mask_threshold=mask_threshold, min_area=min_area, min_area_rel=min_area_rel, tile_size=tile_size,
        tile_overlap=tile_overlap, diameter=diameter, polarity=polarity, batch_size=batch_size,
        decode_chunk=decode_chunk, decode_copies=decode_copies,
        decode_window=decode_window, flip_test=flip_test, precision=precision, return_masks=return_masks,
        progress=progress,
    )
    images, single = _image_list(image, batch)
    net, dev = resolve_model(model, device)
    stain = stain_grey(net)
    prepared = [
        prepare_image(im, channel_axis=channel_axis, channels=channels, normalize=normalize, stain=stain)
        for im in images
    ]
    p = params.for_model(net)
    was_training = bool(getattr(net, "training", False))
    if hasattr(net, "eval"):
        net.eval()
    try:
        with torch.inference_mode(), autocast_context(p.precision, dev):
            results = [segment_at_scale(img, net, dev, p) for img in prepared]
    finally:
        if was_training:
            net.train(True)
    return results[0] if single else results


def segment_at_scale(image: np.ndarray, net: SegmentationModel, dev: torch.device, p: SegmentParams) -> Segmentation:
    """Segment one prepared image at the scale ``p.diameter`` asks for (see :mod:`.scale`); ``p`` is filled
    (:meth:`~.params.SegmentParams.for_model`), its ``tile_size`` the model's scale.

    With ``diameter="auto"`` the first pass is at the size model's scale (the model's own without one);
    when that pass's cells ask for a scale more than ``RESCALE_TOLERANCE`` away, the image is segmented
    once more at theirs (:func:`~.scale.rescale_from_cells`). With ``polarity="auto"`` the whole-cell
    channel of a light-background image is inverted first when the CellFinder prefers it so (at the scale
    chosen for the image as it is; the scale is then chosen again).
    """
    native = p.model_values().tile_size
    model_diameter = inference_defaults(net).cell_diameter
    used: float | None
    measure = p.diameter == AUTO and bool(model_diameter)
    if measure and not has_size_model(net):
        tile, used = native, None
    else:
        tile, used = choose_scale(net, image, native, p.diameter, dev)
    inverted = p.polarity == "inverted" or (
        p.polarity == AUTO and prefers_inverted(net, image, tile, dev, p.model_values().box_threshold))
    if inverted:
        image = invert_whole_cell(image)
        if not (measure and not has_size_model(net)):
            tile, used = choose_scale(net, image, native, p.diameter, dev)
    result = segment_prepared(image, net, dev, p.replace(tile_size=tile))
    result.diameter, result.tile_size, result.inverted = used, tile, inverted
    if not measure or model_diameter is None:
        return result
    again, measured = rescale_from_cells(result.labels, native, model_diameter, tile)
    if again != tile:
        result = segment_prepared(image, net, dev, p.replace(tile_size=again))
        result.diameter, result.tile_size, result.inverted = measured, again, inverted
    elif used is None:
        result.diameter = measured
    return result


def tile_candidates(
    net: SegmentationModel,
    dev: torch.device,
    tiles: Sequence[Tile],
    ti: Sequence[int],
    image: np.ndarray,
    p: SegmentParams,
    stats: dict[str, int],
    cores: Sequence[tuple[float, float, float, float]] | None = None,
) -> list[Candidate]:
    """Run the model on the tiles ``ti`` (one encoder pass) and return their cells in image coordinates.

    ``cores[i]``: the region whose box centres tile ``i`` decodes (:func:`~.tiling.tile_cores`); boxes
    centred elsewhere belong to a neighbouring tile and are not decoded here. None: all boxes.
    ``p``: filled parameters (:meth:`~.params.SegmentParams.for_model`).
    """
    values = p.model_values()
    t_size, s = values.tile_size, int(net.img_size)
    live = [i for i in ti if not blank_tile(image, tiles[i], t_size)]  # a constant tile holds no cell
    stats["blank"] = stats.get("blank", 0) + len(ti) - len(live)
    if not live:
        return []
    ti = live
    batch = torch.from_numpy(np.stack([extract_tile(image, tiles[i], t_size) for i in ti])).to(dev)
    if s != t_size:
        batch = F.interpolate(batch, size=(s, s), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    x = net.preprocess(batch)
    enc = net.encode(x)
    dets = net.postprocess_detections(net.detect(enc, x, flip_test=p.flip_test), box_threshold=values.box_threshold)
    thr = logit_threshold(values.mask_threshold)
    refine = int(inference_defaults(net).refine_boxes)
    sizes = (s,) if s == t_size else (s, t_size)
    scale = t_size / s
    out: list[Candidate] = []
    for b, tile_idx in enumerate(ti):
        tile = tiles[tile_idx]
        boxes, scores = dets[b]["boxes"], dets[b]["scores"]
        stats["boxes"] += int(boxes.shape[0])
        offset = np.array([tile.x0, tile.y0, tile.x0, tile.y0], np.float32)
        bx = boxes.float().cpu().numpy() * scale + offset  # image pixels
        if cores is not None and boxes.shape[0]:
            own = in_core(bx, cores[tile_idx])
            on_dev = torch.from_numpy(own).to(boxes.device)
            boxes, scores, bx = boxes[on_dev], scores[on_dev], bx[own]
        stats["decoded"] += int(boxes.shape[0])
        if boxes.shape[0] == 0:
            continue
        lo, iou = decode_refined(net, enc.embedding[b : b + 1], boxes, thr=thr, rounds=refine,
                                 chunk_size="auto" if p.decode_chunk is None else p.decode_chunk,
                                 window=p.decode_window)
        ious = iou[:, 0].float().cpu().numpy()
        keep = np.flatnonzero(ious >= values.iou_threshold)
        stats["iou_passed"] += int(keep.size)
        bx = np.clip(bx, 0, [image.shape[2], image.shape[1]] * 2)  # padded tiles: keep boxes in the image
        sc = scores.float().cpu().numpy()
        windows = upscale_cells(lo[torch.from_numpy(keep).to(lo.device), 0], sizes, thr,
                                (tile.y1 - tile.y0, tile.x1 - tile.x0))
        for j, win in zip(keep, windows, strict=True):
            if win is None:
                continue
            wy, wx, logits = win
            cand = _crop_cell(logits, thr, values.mask_threshold, p.min_area)
            if cand is None:
                continue
            (cy, cx), crop_logits, mask = cand
            out.append(
                Candidate(
                    tile=tile_idx,
                    y0=tile.y0 + wy + cy,
                    x0=tile.x0 + wx + cx,
                    mask=mask,
                    logits=crop_logits,
                    box=bx[j].astype(np.float32),
                    score=float(sc[j]),
                    iou=float(ious[j]),
                )
            )
    return out


def blank_tile(image: np.ndarray, tile: Tile, tile_size: int) -> bool:
    """Whether the model would see ``tile`` of the (C, H, W) ``image`` as constant (each channel one value,
    zero padding included): such a tile has no cell, so it gets no encoder pass."""
    view = image[:, tile.y0 : tile.y1, tile.x0 : tile.x1].reshape(image.shape[0], -1)
    lo, hi = view.min(axis=1), view.max(axis=1)
    padded = tile.y1 - tile.y0 < tile_size or tile.x1 - tile.x0 < tile_size
    return bool(np.array_equal(lo, hi) and (not padded or not hi.any()))


def decode_refined(net: Any, embedding: Tensor, boxes: Tensor, *, thr: float, rounds: int,
                   chunk_size: int | str | None, window: float | None = None) -> tuple[Tensor, Tensor]:
    """Decode box prompts, then ``rounds`` times re-decode each with the bounding box of its mask.

    Args:
        embedding: (1, D, h, w) one image embedding; boxes: (N, 4) xyxy pixels of the model input.
        thr: logit above which a low-res pixel is inside the mask; a box whose mask is empty is kept.
        window: the decoder's token window per box (``CellSAM.decode``'s ``window``); None: whole frames.
    Returns:
        low-res logits (N, 1, 4h, 4w) and predicted IoUs (N, 1) of the last round.
    """
    kw: dict[str, Any] = {} if window is None else {"window": window}
    lo, iou = net.decode(embedding, boxes=boxes, multimask_output=False, chunk_size=chunk_size, **kw)
    for _ in range(rounds):
        fg = lo[:, 0].float() > thr  # (N, 4h, 4w)
        new = masks_to_boxes(fg).to(boxes) * (float(net.img_size) / fg.shape[-1])
        empty = ~fg.flatten(1).any(dim=1)
        boxes = torch.where(empty[:, None], boxes, new)
        lo, iou = net.decode(embedding, boxes=boxes, multimask_output=False, chunk_size=chunk_size, **kw)
    return lo, iou


def _crop_cell(
    logits: np.ndarray, thr: float, mask_threshold: float, min_area: int
) -> tuple[tuple[int, int], np.ndarray, np.ndarray] | None:
    """Crop one cell's (h, w) tile logits to its foreground and clean it; None if nothing is left."""
    fg = logits > thr
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop = np.ascontiguousarray(logits[y0:y1, x0:x1], dtype=np.float32)
    mask = clean_cell_mask(crop, mask_threshold=mask_threshold)
    if int(mask.sum()) < max(min_area, 1):
        return None
    return (y0, x0), crop, mask


def segment_prepared(image: np.ndarray, net: SegmentationModel, dev: torch.device, p: SegmentParams) -> Segmentation:
    """Segment one prepared (3, H, W) image in [0, 1] with filled parameters ``p`` at ``p.tile_size``."""
    h, w = image.shape[1:]
    t_size = p.model_values().tile_size
    tiles = tile_grid((h, w), tile_size=t_size, overlap=p.tile_overlap)
    cores = None if p.decode_copies else tile_cores(tiles, t_size)
    stats = {"tiles": len(tiles), "boxes": 0, "decoded": 0, "iou_passed": 0}
    starts: Iterable[int] = range(0, len(tiles), p.batch_size)
    if p.progress and len(tiles) > p.batch_size:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="tiles", unit="batch", leave=False)
    cands: list[Candidate] = []
    for i0 in starts:
        cands += tile_candidates(
            net, dev, tiles, list(range(i0, min(i0 + p.batch_size, len(tiles)))), image, p, stats, cores
        )
    stats["masks"] = len(cands)
    return stitch_candidates(cands, tiles, (h, w), p, stats)


def stitch_candidates(cands: Sequence[Candidate], tiles: Sequence[Tile], shape: tuple[int, int],
                      p: SegmentParams, stats: dict[str, int]) -> Segmentation:
    """Every tile's cells -> one :class:`Segmentation`: the doubtful ones dropped (``p.box_threshold_rel``),
    copies across tiles removed, one label image by arg-max, small cells dropped, labels 1..N by
    descending score (``stats`` gains ``confident`` and ``stitched``)."""
    cands = confident(cands, p.model_values().box_threshold_rel)
    stats["confident"] = len(cands)
    keep = deduplicate(list(cands), tiles, shape)
    kept = sorted((cands[i] for i in keep), key=lambda c: -c.score)
    stats["stitched"] = len(kept)
    merged = merge_by_argmax([(c.y0, c.x0, c.mask, c.logits) for c in kept], shape)
    labels, old_ids = clean_labels(merged, min_area=p.min_area, min_area_rel=p.min_area_rel)
    final = [kept[i - 1] for i in old_ids]
    n = len(final)
    message = ""
    if n == 0:
        message = (
            f"no cells found: {stats.get('boxes', 0)} box(es) scored >= box_threshold={p.box_threshold}, "
            f"{stats.get('iou_passed', 0)} mask(s) had predicted IoU >= iou_threshold={p.iou_threshold}, "
            f"{stats.get('masks', 0)} mask(s) had >= min_area={p.min_area} px above "
            f"mask_threshold={p.mask_threshold}"
        )
        log.debug(message)  # the result carries it; callers that report (files, CLI, napari) show it once
    return Segmentation(
        labels=labels,
        boxes=np.array([c.box for c in final], np.float32).reshape(n, 4),
        scores=np.array([c.score for c in final], np.float32),
        ious=np.array([c.iou for c in final], np.float32),
        masks=[CellMask(c.y0, c.x0, c.mask) for c in final] if p.return_masks else None,
        message=message,
        stats=stats,
    )
