"""Prompt study: ground-truth boxes vs centre-of-mass points through the real tiling / scaling path.

``PromptFake`` decodes a box prompt to exactly that box and a point prompt to a small square around the
point, at the encoder's resolution (S = 2 x tile). Box prompts on square cells must therefore give the
ground truth back exactly, through tiles, resizing and merging, and point masks must be centred on each
cell: any error in prompt coordinates shows up as lost IoU or shifted centroids.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from cellsam.eval.harness import load_prepared, write_json
from cellsam.eval.metrics import evaluate_labels
from cellsam.eval.prompts import assign_tiles, click_ious, prompt_predict, prompt_study
from cellsam.inference.tiling import Tile
from cellsam.models.build import build_model
from tests.test_eval_harness import write_prepared


class PromptFake:
    """Model contract with a decoder that draws the prompt: box -> the box, point -> a 4x4 (S px) square."""

    training = False
    device = torch.device("cpu")

    def __init__(self, img_size: int = 64, tile_size: int = 32) -> None:
        self.img_size = img_size
        self.cfg = SimpleNamespace(tile_size=tile_size)
        yy, xx = torch.meshgrid(torch.arange(img_size) + 0.5, torch.arange(img_size) + 0.5, indexing="ij")
        self.yy, self.xx = yy, xx  # continuous pixel centres of the S x S input

    def eval(self) -> PromptFake:
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(embedding=torch.zeros(x.shape[0], 1, 4, 4))

    def detect(self, *a, **k):  # pragma: no cover - not used by the prompt study
        raise AssertionError("the prompt study must not run the detector")

    postprocess_detections = detect

    def decode(self, embedding, *, boxes=None, points=None, mask_input=None, multimask_output=False,
               chunk_size=None):
        if boxes is not None:
            b = boxes[:, :, None, None]
            inside = (self.xx >= b[:, 0]) & (self.xx < b[:, 2]) & (self.yy >= b[:, 1]) & (self.yy < b[:, 3])
        else:
            c = points[0][:, 0, :, None, None] + 0.5  # SAM: index -> continuous centre
            inside = ((self.xx - c[:, 0]).abs() <= 2) & ((self.yy - c[:, 1]).abs() <= 2)
        lo = torch.where(inside, 8.0, -8.0)[:, None]
        m = 3 if multimask_output else 1
        return lo.repeat(1, m, 1, 1), torch.full((lo.shape[0], m), 0.9)

    def upscale_logits(self, lo: torch.Tensor) -> torch.Tensor:
        return lo


def squares(shape: tuple[int, int] = (70, 90), n: int = 14, seed: int = 0) -> np.ndarray:
    """Non-touching squares of odd side 5 or 7 (odd: the centre of mass is a pixel centre)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int32)
    k = 0
    for _ in range(2000):
        side = int(rng.choice([5, 7]))
        y, x = int(rng.integers(0, shape[0] - side)), int(rng.integers(0, shape[1] - side))
        if lab[max(0, y - 2) : y + side + 2, max(0, x - 2) : x + side + 2].any():
            continue
        k += 1
        lab[y : y + side, x : x + side] = k
        if k == n:
            break
    return lab


def test_box_prompts_give_square_cells_back_exactly_through_tiles() -> None:
    gt = squares()
    image = np.zeros((3, *gt.shape), np.float32)
    pred = prompt_predict(PromptFake(), image, gt, prompt="box", min_area=1)
    res = evaluate_labels([gt], [pred.labels], iou_thresholds=(0.95,), coco=False, per_image=False)
    assert res["by_threshold"]["0.95"]["f1"] == 1.0 and res["n_pred"] == gt.max()
    assert len(pred.masks) == gt.max() and np.allclose(pred.scores, 0.9)


def test_point_prompts_are_centred_on_the_centre_of_mass() -> None:
    gt = squares(seed=1)
    image = np.zeros((3, *gt.shape), np.float32)
    pred = prompt_predict(PromptFake(), image, gt, prompt="point", min_area=1)
    ids = np.arange(1, gt.max() + 1)
    true_c = np.array(ndimage.center_of_mass(np.ones_like(gt), gt, ids))
    got = np.array([np.argwhere(m.mask).mean(0) + (m.y0, m.x0) for m in pred.masks])
    assert len(got) == len(ids)
    order = np.argmin(((got[:, None] - true_c[None]) ** 2).sum(-1), axis=1)
    assert np.abs(got - true_c[order]).max() <= 0.51 and len(set(order)) == len(ids)
    # 2x2 point masks inside 5-7 px squares: one per cell, none matched at IoU 0.5
    res = evaluate_labels([gt], [pred.labels], coco=False, per_image=False)
    assert res["by_threshold"]["0.50"]["tp"] == 0 and res["n_pred"] == len(ids)


def test_click_ious_score_each_innermost_click_mask_alone() -> None:
    """The fake decoder draws a 5x5 square about the click: a 5-px cell clicked at its innermost
    (centre) pixel is found exactly (IoU 1), a 7-px one at 25/49; a cell the decoder misses scores 0."""
    gt = squares(seed=3)
    image = np.zeros((3, *gt.shape), np.float32)
    got = click_ious(PromptFake(img_size=32, tile_size=32), image, gt, min_area=1)  # 1 input px = 1 image px
    assert set(got) == set(range(1, gt.max() + 1))
    for cid, iou in got.items():
        side = int(np.sqrt((gt == cid).sum()))
        assert iou == pytest.approx(1.0 if side == 5 else 25 / 49), (cid, side)
    assert sorted({round(v, 3) for v in got.values()}) == [round(25 / 49, 3), 1.0]  # both sizes present
    lonely = np.zeros((40, 40), np.int32)
    lonely[10:30, 10:30] = 1  # a 20-px cell: the click's 5x5 mask covers 25 of its 400 pixels
    got = click_ious(PromptFake(32, 32), np.zeros((3, 40, 40), np.float32), lonely, min_area=1)
    assert got[1] == pytest.approx(25 / 400)


def test_multimask_keeps_one_mask_per_prompt() -> None:
    gt = squares(seed=2)
    pred = prompt_predict(PromptFake(), np.zeros((3, *gt.shape), np.float32), gt, prompt="box", multimask=True,
                          min_area=1)
    assert pred.labels.max() == gt.max()


def test_assign_tiles_prefers_widest_margin_then_largest_overlap() -> None:
    tiles = [Tile(0, 0, 32, 32), Tile(0, 24, 32, 56), Tile(24, 0, 56, 32)]
    boxes = np.array([[10, 25, 15, 30],    # inside tiles 0 and 1: margin 2 in tile 0, 1 in tile 1 -> 0
                      [10, 26, 15, 31],    # margin 1 in tile 0, 2 in tile 1 -> 1
                      [28, 10, 36, 20],    # only tile 2 contains it
                      [20, 28, 40, 40]])   # no tile contains it; largest share in tile 1
    assert assign_tiles(boxes, tiles).tolist() == [0, 1, 2, 1]
    assert assign_tiles(np.zeros((0, 4)), tiles).shape == (0,)


def test_bad_inputs() -> None:
    gt = squares()
    with pytest.raises(ValueError, match="prompt must be one of"):
        prompt_predict(PromptFake(), np.zeros((3, *gt.shape), np.float32), gt, prompt="circle")
    with pytest.raises(ValueError, match="expected image"):
        prompt_predict(PromptFake(), np.zeros((3, 10, 10), np.float32), gt)


def test_prompt_study_with_the_tiny_model_reports_both_prompts(tmp_path: Path) -> None:
    root = write_prepared(tmp_path / "p", n_val=2)
    torch.manual_seed(0)
    net = build_model("vit_tiny").eval()
    rep = prompt_study(net, load_prepared(root, "val"))
    assert set(rep["methods"]) == {"prompt:box", "prompt:point"}
    for res in rep["methods"].values():
        assert res["overall"]["n_true"] == 16 and res["overall"]["n_pred"] <= 16  # one mask per true cell at most
        assert res["overall"]["coco"]["detections"].startswith("per-cell masks")
        assert set(res["by_source"]) == {"blobsA", "blobsB"}
    out = write_json(tmp_path / "p.json", rep)
    assert json.loads(out.read_text())["prompt_study"]["prompts"] == ["box", "point"]
