"""Prompt study (paper section 2.2, Fig. 2b): masks from ground-truth prompts, box vs point.

For every ground-truth cell the mask decoder gets one prompt taken from the truth: its tight box
(xyxy, exclusive end, the convention the decoder is trained with) or one positive point at its centre of
mass. CellFinder is not used, so the study isolates the prompt type. Everything else follows
:func:`cellsam.segment`: images are cut into the model's tiles (each cell is prompted in the tile that
holds it with the widest margin, or the one that holds most of it), a tile is resized to the model's
input side S and encoded once, logits are upscaled back to the tile, each cell is binarised at
``mask_threshold``, keeps its largest island and gets its holes filled, and the cells are merged into one
label image by arg-max over logits (cells under ``min_area`` dropped). COCO AP uses the per-cell masks
before the merge, scored by the predicted IoU.

A centre of mass can fall outside a curved cell; the paper prompts with it all the same, and so do we.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from cellsam.eval.harness import EvalItem, Prediction, TruthMethod, evaluate_methods
from cellsam.inference.runtime import resolve_model
from cellsam.inference.segment import DEFAULT_MIN_AREA, _crop_cell
from cellsam.inference.tiling import Tile, extract_tile, holding_tiles, tile_grid
from cellsam.models.protocol import PromptableModel, model_tile_size
from cellsam.ops.masks import CellMask, clean_labels, logit_threshold, merge_by_argmax
from cellsam.train.clicks import innermost_points

__all__ = ["PROMPTS", "assign_tiles", "click_ious", "prompt_predict", "prompt_method", "prompt_study", "prompted_cells"]

ModelArg = PromptableModel | str | os.PathLike
"""A model object, or a weights name / checkpoint path (:func:`~cellsam.inference.runtime.resolve_model`)."""

PROMPTS = ("box", "point", "click")
"""``box``: the tight box; ``point``: one positive point at the centre of mass (the paper's study);
``click``: one positive point at the innermost pixel (as a person clicks a cell)."""


def assign_tiles(bboxes: np.ndarray, tiles: Sequence[Tile]) -> np.ndarray:
    """The tile each object is prompted in: :func:`~cellsam.inference.tiling.holding_tiles` of its box.

    Args:
        bboxes: (N, 4) int (y0, x0, y1, x1) object boxes, exclusive end.
        tiles: the tile grid.

    Returns:
        (N,) int64 tile index: among tiles containing the whole box, the one with the widest margin
        between box and tile edge; if none contains it, the one with the largest share of the box.
    """
    return holding_tiles(np.asarray(bboxes, np.int64).reshape(-1, 4)[:, [1, 0, 3, 2]], tiles)


def _prompts(
    gt_tile: np.ndarray, ids: np.ndarray, prompt: str, scale: float
) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """Decoder prompts ``(boxes, points)`` of the objects ``ids`` from a (t, t) ground-truth tile, in encoder
    pixels: (N, 4) xyxy boxes for ``prompt == "box"``, else (N, 1, 2) xy points with (N, 1) labels."""
    if prompt == "box":
        sl = ndimage.find_objects(gt_tile)
        boxes = [[sl[i - 1][1].start, sl[i - 1][0].start, sl[i - 1][1].stop, sl[i - 1][0].stop] for i in ids]
        return torch.tensor(boxes, dtype=torch.float32) * scale, None
    if prompt == "click":
        inner = innermost_points(gt_tile, ids)
        com = np.array([inner[int(i)][::-1] for i in ids], np.float64).reshape(-1, 2)  # (row, col)
    else:
        com = np.array(ndimage.center_of_mass(np.ones_like(gt_tile), gt_tile, ids), np.float64).reshape(-1, 2)
    xy = (com[:, ::-1] + 0.5) * scale - 0.5  # pixel index -> index in the resized image (SAM adds 0.5)
    coords = torch.tensor(xy, dtype=torch.float32)[:, None, :]
    return None, (coords, torch.ones(len(ids), 1, dtype=torch.int64))


def prompt_predict(model: ModelArg, image: np.ndarray, gt: np.ndarray, *, prompt: str = "box",
                   tile_size: int | None = None, tile_overlap: float = 0.25, mask_threshold: float = 0.5,
                   min_area: int = DEFAULT_MIN_AREA, multimask: bool = False, decode_chunk: int = 32,
                   device: str | torch.device | None = None) -> Prediction:
    """Masks of every ground-truth cell of one image from ground-truth prompts.

    Args:
        model: a CellSAM model, or a name / checkpoint path.
        image: (3, H, W) prepared image in [0, 1]. gt: (H, W) integer labels.
        prompt: one of :data:`PROMPTS`.
        tile_size: tile side in image pixels (None = the model's ``cfg.tile_size``).
        multimask: decode 3 masks per prompt and keep the one with the highest predicted IoU (SAM's
            advice for ambiguous single points); False = one mask, as CellSAM decodes boxes.

    Returns:
        a :class:`~cellsam.eval.harness.Prediction`: labels (H, W), per-cell masks and predicted IoUs.
    """
    t0 = time.perf_counter()
    cells = list(prompted_cells(model, image, gt, prompt=prompt, tile_size=tile_size, tile_overlap=tile_overlap,
                                mask_threshold=mask_threshold, min_area=min_area, multimask=multimask,
                                decode_chunk=decode_chunk, device=device))
    h, w = np.asarray(gt).shape
    labels, old = clean_labels(merge_by_argmax([c[1:5] for c in cells], (h, w)), min_area=min_area)
    kept = [int(k) - 1 for k in old]
    masks = [CellMask(cells[k][1], cells[k][2], cells[k][3]) for k in kept]
    return Prediction(labels, masks, np.array([cells[k][5] for k in kept], np.float64), time.perf_counter() - t0)


def click_ious(model: ModelArg, image: np.ndarray, gt: np.ndarray, **kwargs: Any) -> dict[int, float]:
    """IoU with its cell of the mask that one click on each cell's innermost pixel gives.

    Arguments as :func:`prompt_predict` (``prompt`` is ``"click"``). Returns {cell id: IoU}, 0 for a
    cell whose click gave no mask; each mask is scored alone (no merge with its neighbours).
    """
    gt = np.asarray(gt)
    got = {}
    for cid, y0, x0, mask, _, _ in prompted_cells(model, image, gt, prompt="click", **kwargs):
        cell = gt == cid
        pred = np.zeros_like(cell)
        pred[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
        got[cid] = float((cell & pred).sum() / max((cell | pred).sum(), 1))
    ids = np.unique(gt[gt > 0])
    return {int(i): got.get(int(i), 0.0) for i in ids}


def prompted_cells(model: ModelArg, image: np.ndarray, gt: np.ndarray, *, prompt: str = "box",
                   tile_size: int | None = None, tile_overlap: float = 0.25, mask_threshold: float = 0.5,
                   min_area: int = DEFAULT_MIN_AREA, multimask: bool = False, decode_chunk: int = 32,
                   device: str | torch.device | None = None
                   ) -> Iterator[tuple[int, int, int, np.ndarray, np.ndarray, float]]:
    """Per ground-truth cell its prompted mask: (id, y0, x0, mask (h, w) bool, logits (h, w), predicted IoU).

    Arguments as :func:`prompt_predict`; cells whose mask is empty or under ``min_area`` are skipped.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    image = np.asarray(image, np.float32)
    gt = np.asarray(gt)
    if image.ndim != 3 or image.shape[0] != 3 or gt.shape != image.shape[1:]:
        raise ValueError(f"expected image (3, H, W) and labels (H, W), got {image.shape} and {gt.shape}")
    thr = logit_threshold(mask_threshold)
    net, dev = resolve_model(model, device)
    t = int(tile_size or model_tile_size(net))
    s = int(net.img_size)
    h, w = gt.shape
    tiles = tile_grid((h, w), tile_size=t, overlap=tile_overlap)
    slices = ndimage.find_objects(gt.astype(np.int64, copy=False))
    ids = np.array([i + 1 for i, sl in enumerate(slices) if sl is not None], np.int64)
    bboxes = np.array([[slices[i - 1][0].start, slices[i - 1][1].start, slices[i - 1][0].stop,
                        slices[i - 1][1].stop] for i in ids], np.int64).reshape(-1, 4)
    where = assign_tiles(bboxes, tiles)
    was_training = bool(getattr(net, "training", False))
    if hasattr(net, "eval"):
        net.eval()
    try:
        with torch.inference_mode():
            for ti in np.unique(where):
                tile = tiles[int(ti)]
                vh, vw = tile.y1 - tile.y0, tile.x1 - tile.x0
                x = torch.from_numpy(extract_tile(image, tile, t)[None]).to(dev)
                if s != t:
                    x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
                emb = net.encode(net.preprocess(x)).embedding
                gt_tile = np.zeros((t, t), np.int64)
                gt_tile[:vh, :vw] = gt[tile.y0 : tile.y1, tile.x0 : tile.x1]
                mine = ids[where == ti]
                for c0 in range(0, len(mine), decode_chunk):
                    chunk = mine[c0 : c0 + decode_chunk]
                    boxes, points = _prompts(gt_tile, chunk, prompt, s / t)
                    lo, iou = net.decode(emb, boxes=None if boxes is None else boxes.to(dev),
                                         points=None if points is None else (points[0].to(dev), points[1].to(dev)),
                                         multimask_output=multimask, chunk_size=None)
                    best = iou.argmax(dim=1)
                    lo = lo[torch.arange(len(chunk)), best][:, None]
                    iou = iou[torch.arange(len(chunk)), best]
                    up = net.upscale_logits(lo)
                    if s != t:
                        up = F.interpolate(up, size=(t, t), mode="bilinear", align_corners=False)
                    tile_logits = up[:, 0, :vh, :vw].float().cpu().numpy()
                    for j in range(len(chunk)):
                        cell = _crop_cell(tile_logits[j], thr, mask_threshold, min_area)  # as cellsam.segment
                        if cell is not None:
                            (y0, x0), crop, mask = cell
                            yield int(chunk[j]), tile.y0 + y0, tile.x0 + x0, mask, crop, float(iou[j])
    finally:
        if was_training and isinstance(net, torch.nn.Module):  # only a Module has a training mode to restore
            net.train(True)


@dataclass
class _PromptMethod:
    """:func:`prompt_predict` with one model and prompt type, as a :class:`~cellsam.eval.harness.TruthMethod`."""

    net: PromptableModel
    prompt: str
    kwargs: dict[str, Any]
    uses_truth: bool = True

    def __call__(self, image: np.ndarray, gt: np.ndarray, /) -> Prediction:
        return prompt_predict(self.net, image, gt, prompt=self.prompt, **self.kwargs)


def prompt_method(model: ModelArg, prompt: str, **kwargs: Any) -> TruthMethod:
    """:func:`prompt_predict` as an evaluation method that reads the ground truth (``uses_truth``)."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    net, _ = resolve_model(model, kwargs.pop("device", None))
    return _PromptMethod(net, prompt, kwargs)


def prompt_study(model: ModelArg, items: Sequence[EvalItem], *, prompts: Sequence[str] = ("box", "point"),
                 progress: bool = False, **kwargs: Any) -> dict:
    """Score ground-truth box and point prompts with every metric (as :func:`evaluate_methods`).

    Returns:
        the harness report with methods ``"prompt:box"`` and ``"prompt:point"``.
    """
    methods = {f"prompt:{p}": prompt_method(model, p, **kwargs) for p in prompts}
    report = evaluate_methods(items, methods, progress=progress)
    report["prompt_study"] = {"prompts": list(prompts), "settings": {k: str(v) for k, v in kwargs.items()},
                              "note": "ground-truth prompts, one per cell; no CellFinder"}
    return report
