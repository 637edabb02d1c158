"""Tile grid, stitching rules, and the proof that tiled segmentation neither cuts nor duplicates cells.

The proof uses :class:`FakeModel`, an exact implementation of the model contract that "sees" the
ground truth: the test image carries its own pixel coordinates in the R (y) and G (x) channels, so the
fake can look up which true cell each pixel of a tile belongs to. It detects the cells visible in each
tile (cut ones as cut boxes, as a real detector would) and decodes each box to that cell's visible mask.
Any duplicate or cut cell in the output is therefore the stitching's fault.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from cellsam.inference.segment import segment
from cellsam.inference.tiling import (
    Candidate,
    Tile,
    confident,
    deduplicate,
    extract_tile,
    holding_tiles,
    in_core,
    inner_margin,
    score_floor,
    tile_cores,
    tile_grid,
)


class FakeModel:
    """Implements the CellSAM model contract on images made by :func:`coord_image`.

    Args:
        truth: (H, W) int labels of the full image the tiles come from.
        img_size: the model input side S.
        score: optional ``label -> box score``; iou: optional ``label -> predicted IoU`` (default 0.9).
    """

    def __init__(self, truth: np.ndarray, img_size: int, score=None, iou=None) -> None:
        self.truth = torch.from_numpy(truth.astype(np.int64))
        self.img_size = img_size
        self.score = score or (lambda lab: 0.9)
        self.iou = iou or (lambda lab: 0.9)
        self.encoder_batches: list[int] = []
        self.flip_tests: list[str | bool | None] = []

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, self.img_size, self.img_size)
        return x

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        self.encoder_batches.append(x.shape[0])
        h, w = self.truth.shape
        ys = torch.round(x[:, 0] * (h + 1) - 1).long()
        xs = torch.round(x[:, 1] * (w + 1) - 1).long()
        valid = (ys >= 0) & (xs >= 0) & (ys < h) & (xs < w) & (x[:, 0] > 0) & (x[:, 1] > 0)
        lab = self.truth[ys.clamp(0, h - 1), xs.clamp(0, w - 1)] * valid
        return SimpleNamespace(trunk=lab, embedding=lab[:, None].float())

    def _boxes(self, lab: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        ids, boxes = [], []
        for i, sl in enumerate(ndimage.find_objects(lab.numpy()), start=1):
            if sl is not None:
                ids.append(i)
                boxes.append([sl[1].start, sl[0].start, sl[1].stop, sl[0].stop])
        return ids, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)

    def detect(self, enc: SimpleNamespace, images: torch.Tensor | None = None, *,
               flip_test: str | bool | None = None) -> dict:
        self.flip_tests.append(flip_test)
        return {"labels": enc.trunk}

    def postprocess_detections(self, outputs: dict, *, box_threshold: float) -> list[dict]:
        out = []
        for lab in outputs["labels"]:
            ids, boxes = self._boxes(lab)
            scores = torch.tensor([self.score(i) for i in ids], dtype=torch.float32)
            keep = scores >= box_threshold
            out.append({"boxes": boxes[keep], "scores": scores[keep]})
        return out

    def decode(self, embedding, *, boxes, multimask_output=False, chunk_size=None, **_):
        lab = embedding[0, 0].long()
        ids, all_boxes = self._boxes(lab)
        logits, ious = [], []
        for b in boxes:
            i = ids[int((all_boxes - b).abs().sum(1).argmin())]
            logits.append(torch.where(lab == i, 8.0, -8.0))
            ious.append(self.iou(i))
        return torch.stack(logits)[:, None], torch.tensor(ious)[:, None]

    def upscale_logits(self, low_res: torch.Tensor) -> torch.Tensor:
        return low_res


def coord_image(labels: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 CellSAM image: R = (y+1)/(H+1), G = (x+1)/(W+1), B = foreground."""
    h, w = labels.shape
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    return np.stack([(yy + 1) / (h + 1), (xx + 1) / (w + 1), (labels > 0) * 0.8]).astype(np.float32)


def random_cells(shape: tuple[int, int], n: int, radius: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(H, W) int32 labels of up to ``n`` non-overlapping (possibly touching) ellipses."""
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.int32)
    k = 0
    for _ in range(n * 20):
        if k == n:
            break
        ry, rx = rng.integers(radius[0], radius[1] + 1, size=2)
        cy, cx = int(rng.integers(ry, h - ry)), int(rng.integers(rx, w - rx))
        yy, xx = np.mgrid[-ry : ry + 1, -rx : rx + 1]
        disk = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1
        win = labels[cy - ry : cy + ry + 1, cx - rx : cx + rx + 1]
        if win[disk].any():
            continue
        k += 1
        win[disk] = k
    return labels


def match_ious(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(n_true, n_pred) mask IoU matrix."""
    nt, npred = int(truth.max()), int(pred.max())
    inter = np.zeros((nt + 1, npred + 1))
    np.add.at(inter, (truth.ravel(), pred.ravel()), 1)
    at, ap = inter.sum(1, keepdims=True), inter.sum(0, keepdims=True)
    iou = inter / np.maximum(at + ap - inter, 1)
    return iou[1:, 1:]


def straddling(truth: np.ndarray, tiles: list[Tile]) -> int:
    """Number of true cells crossing an inner tile edge (cut in at least one tile)."""
    h, w = truth.shape
    cut = set()
    for t in tiles:
        for y in {t.y0, t.y1} - {0, h}:
            above, below = truth[y - 1], truth[y]
            cut |= set(np.intersect1d(above[above > 0], below[below > 0]).tolist())
        for x in {t.x0, t.x1} - {0, w}:
            left, right = truth[:, x - 1], truth[:, x]
            cut |= set(np.intersect1d(left[left > 0], right[right > 0]).tolist())
    return len(cut)


# ---------------------------------------------------------------- grid
def test_grid_covers_image_with_at_least_the_requested_overlap() -> None:
    tiles = tile_grid((1200, 1300), tile_size=512, overlap=0.25)
    cover = np.zeros((1200, 1300), int)
    for t in tiles:
        assert t.y1 - t.y0 == 512 and t.x1 - t.x0 == 512
        cover[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert cover.min() >= 1
    ys = sorted({t.y0 for t in tiles})
    xs = sorted({t.x0 for t in tiles})
    assert ys[0] == 0 and ys[-1] == 1200 - 512 and xs[-1] == 1300 - 512
    assert max(np.diff(ys)) <= 384 and max(np.diff(xs)) <= 384


def test_small_image_is_one_padded_tile() -> None:
    tiles = tile_grid((100, 700), tile_size=512, overlap=0.25)
    assert [(t.y0, t.y1) for t in tiles] == [(0, 100), (0, 100)]
    img = np.ones((3, 100, 700), np.float32)
    t = extract_tile(img, tiles[0], 512)
    assert t.shape == (3, 512, 512) and t[:, :100, :512].min() == 1 and t[:, 100:].max() == 0


@pytest.mark.parametrize(
    "kw", [{"tile_size": 8}, {"tile_size": 64, "overlap": 1.0}, {"tile_size": 64, "overlap": -0.1}]
)
def test_grid_rejects_bad_parameters(kw: dict) -> None:
    with pytest.raises(ValueError):
        tile_grid((100, 100), **kw)


def test_inner_margin_ignores_image_borders() -> None:
    shape = (1000, 1000)
    assert inner_margin((0, 0, 10, 10), Tile(0, 0, 1000, 1000), shape) == float("inf")
    assert inner_margin((0, 0, 10, 10), Tile(0, 0, 512, 512), shape) == 502
    assert inner_margin((400, 500, 410, 510), Tile(0, 0, 512, 512), shape) == 2


# ---------------------------------------------------------------- dedupe rules
def _cand(tile: int, y0: int, x0: int, mask: np.ndarray, score: float = 0.9) -> Candidate:
    return Candidate(
        tile, y0, x0, mask, np.where(mask, 5.0, -5.0).astype(np.float32), np.zeros(4, np.float32), score, 0.9
    )


def test_cut_copy_with_small_iou_is_dropped_for_the_complete_one() -> None:
    tiles = [Tile(0, 0, 100, 100), Tile(0, 75, 100, 175)]
    full = np.ones((10, 20), bool)  # x 90..110: complete in tile 1, cut at x=100 in tile 0
    a = _cand(0, 40, 90, full[:, :10], score=0.99)  # the cut copy (IoU with full = 0.5)
    sliver = _cand(0, 60, 98, np.ones((10, 2), bool))  # another cell: 2 px visible in tile 0 (IoU 0.1)
    b = _cand(1, 40, 90, full)
    c = _cand(1, 60, 98, np.ones((10, 20), bool))
    assert deduplicate([a, sliver, b, c], tiles, (100, 175)) == [2, 3]


def test_unmatched_border_cell_is_kept_and_distinct_neighbours_survive() -> None:
    tiles = [Tile(0, 0, 100, 100), Tile(0, 75, 100, 175)]
    a = _cand(0, 10, 90, np.ones((10, 10), bool))  # touches tile 0's inner edge, nothing in tile 1 (missed)
    b = _cand(1, 50, 80, np.ones((10, 10), bool))
    c = _cand(1, 50, 90, np.ones((10, 10), bool))  # touching neighbour of b in the same tile
    assert deduplicate([a, b, c], tiles, (100, 175)) == [0, 1, 2]


def test_same_tile_duplicates_keep_the_best_score() -> None:
    tiles = [Tile(0, 0, 100, 100)]
    m = np.ones((10, 10), bool)
    m2 = m.copy()
    m2[0, 0] = False
    cells = [_cand(0, 5, 5, m, score=0.5), _cand(0, 5, 5, m2, score=0.8), _cand(0, 50, 50, m, score=0.3)]
    assert deduplicate(cells, tiles, (100, 100)) == [1, 2]


def test_relative_box_threshold_keeps_the_cells_near_the_images_confident_ones() -> None:
    m = np.ones((4, 4), bool)
    scores = [0.9, 0.8, 0.8, 0.7, 0.5, 0.45, 0.35, 0.31, 0.9, 0.85]
    cells = [_cand(0, 10 * k, 0, m, score=s) for k, s in enumerate(scores)]
    q90 = float(np.quantile(scores, 0.9))  # 0.9
    assert score_floor(np.array(scores), 0.5) == pytest.approx(0.5 * q90)
    assert [c.score for c in confident(cells, 0.5)] == [s for s in scores if s >= 0.45]
    assert confident(cells, 0.0) == cells and confident([], 0.5) == [] and score_floor(np.zeros(0), 0.5) == 0.0
    faint = [_cand(0, 10 * k, 0, m, score=s) for k, s in enumerate([0.34, 0.32, 0.31, 0.3])]
    assert len(confident(faint, 0.5)) == 4  # an image whose cells all score low keeps them


def test_segment_drops_cells_under_the_relative_box_threshold() -> None:
    truth = random_cells((300, 350), n=60, radius=(5, 14), seed=5)
    ids = np.unique(truth[truth > 0])
    score = {int(i): (0.3 if i % 3 == 0 else 0.8) for i in ids}  # every third cell doubtful
    model = FakeModel(truth, img_size=128, score=lambda lab: score[int(lab)])
    image = coord_image(truth)
    kw = dict(channel_axis=0, normalize=False, tile_size=128, box_threshold=0.2)
    every = segment(image, model, box_threshold_rel=0.0, **kw)
    sure = segment(image, model, box_threshold_rel=0.5, **kw)  # floor 0.4: the 0.3 cells go
    doubtful = sum(s == 0.3 for s in score.values())
    assert int(np.sum(np.isclose(every.scores, 0.3))) >= doubtful - 2 > 10  # they are there without it
    assert np.all(sure.scores == np.float32(0.8)) and sure.n_cells == sum(s == 0.8 for s in score.values())
    assert sure.stats["confident"] < sure.stats["masks"] and every.stats["confident"] == every.stats["masks"]
    kept = np.unique(truth[sure.labels > 0])
    assert all(score[int(i)] == 0.8 for i in kept if i)


def test_segment_asks_the_detector_for_the_flip_test_given_or_the_models_own() -> None:
    import dataclasses

    from cellsam.config import InferenceConfig
    from cellsam.inference.params import SegmentParams

    truth = random_cells((160, 160), n=8, radius=(5, 9), seed=3)
    image = coord_image(truth)
    kw = dict(channel_axis=0, normalize=False, tile_size=128, polarity="as_is")
    # FakeModel's own (no cfg): off; True / False are the first flip test's "mirrors" / "off"
    for given, want in ((None, "off"), (True, "mirrors"), (False, "off"), ("rot180", "rot180")):
        model = FakeModel(truth, img_size=128)
        segment(image, model, flip_test=given, **kw)
        assert model.flip_tests and set(model.flip_tests) == {want}
    on = dataclasses.replace(InferenceConfig(), flip_test=True)  # an older model file's True
    assert on.flip_test == "mirrors"
    assert SegmentParams().filled_from(256, on).flip_test == "mirrors"
    assert SegmentParams(flip_test=False).filled_from(256, on).flip_test == "off"
    assert SegmentParams(flip_test="rot180").filled_from(256, on).flip_test == "rot180"
    assert SegmentParams().filled_from(256, InferenceConfig()).flip_test == "off"
    for bad in ("yes", "Mirrors", 1, ""):
        with pytest.raises(ValueError, match="flip_test must be one of off, mirrors, rot180"):
            SegmentParams(flip_test=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="inference.flip_test must be one of"):
            InferenceConfig(flip_test=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the proof
def _check_one_to_one(truth: np.ndarray, pred: np.ndarray, min_iou: float) -> None:
    n_true = int(truth.max())
    assert int(pred.max()) == n_true, f"{int(pred.max())} labels for {n_true} cells"
    assert len(np.unique(pred[pred > 0])) == n_true
    iou = match_ious(truth, pred)
    best = iou.max(1)
    assert best.min() > min_iou, f"worst cell IoU {best.min():.3f}"
    assert (iou > 0.5).sum(0).max() == 1 and (iou > 0.5).sum(1).max() == 1  # one-to-one


def test_large_image_every_cell_exactly_once() -> None:
    truth = random_cells((1200, 1300), n=400, radius=(5, 30), seed=3)
    tiles = tile_grid(truth.shape, tile_size=512, overlap=0.25)
    assert len(tiles) == 12
    assert straddling(truth, tiles) >= 40  # the test is meaningful: many cells are cut by tile edges
    model = FakeModel(truth, img_size=512)
    # radii 5-30: the smallest cells are under 0.15 x the median area, kept here (this tests stitching)
    seg = segment(coord_image(truth), model, channel_axis=0, normalize=False, tile_size=512, batch_size=5,
                  min_area_rel=0.0)
    assert model.encoder_batches == [5, 5, 2]
    _check_one_to_one(truth, seg.labels, 0.99)
    assert seg.boxes.shape == (seg.n_cells, 4)
    # boxes are in image pixels: each box is its cell's bounding box
    for k, sl in enumerate(ndimage.find_objects(seg.labels)):
        np.testing.assert_allclose(seg.boxes[k], [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop], atol=1)


def test_tiles_resized_to_the_model_input_and_mapped_back() -> None:
    truth = random_cells((300, 350), n=60, radius=(5, 14), seed=5)
    tiles = tile_grid(truth.shape, tile_size=128, overlap=0.25)
    assert straddling(truth, tiles) >= 10
    model = FakeModel(truth, img_size=256)  # every 128 tile is upsampled x2
    seg = segment(coord_image(truth), model, channel_axis=0, normalize=False, tile_size=128, batch_size=8)
    _check_one_to_one(truth, seg.labels, 0.85)


def test_stitching_with_a_large_overlap_and_touching_cells() -> None:
    # a grid of touching squares, denser than any tile edge can avoid
    truth = np.zeros((260, 260), np.int32)
    k = 0
    for y in range(0, 260, 20):
        for x in range(0, 260, 20):
            k += 1
            truth[y : y + 20, x : x + 20] = k
    model = FakeModel(truth, img_size=96)
    seg = segment(coord_image(truth), model, channel_axis=0, normalize=False, tile_size=96, tile_overlap=0.5)
    _check_one_to_one(truth, seg.labels, 0.99)


def test_tile_cores_partition_the_image_and_keep_cells_away_from_inner_edges() -> None:
    shape, size = (1000, 700), 256
    tiles = tile_grid(shape, tile_size=size, overlap=0.25)
    yy, xx = np.mgrid[: shape[0], : shape[1]] + 0.5
    pts = np.stack([xx.ravel(), yy.ravel(), xx.ravel(), yy.ravel()], 1)  # zero-size boxes at pixel centres
    for band, lo, hi in ((0.0, 1, 1), (8.0, 1, 4)):
        cores = tile_cores(tiles, size, band=band)
        count = sum(in_core(pts, c).astype(int) for c in cores)
        assert count.min() == lo and count.max() == hi
        for t, c in zip(tiles, cores, strict=True):
            own = pts[in_core(pts, c)]
            margin = inner_margin((own[:, 1].min(), own[:, 0].min(), own[:, 1].max(), own[:, 0].max()), t, shape)
            assert margin >= size * 0.25 / 2 - band - 1  # half the overlap, less the band
    assert tile_cores([Tile(0, 0, 50, 60)], 64) == [(-np.inf, np.inf, -np.inf, np.inf)]


def test_cells_in_overlaps_are_decoded_once() -> None:
    truth = random_cells((700, 700), n=150, radius=(5, 12), seed=4)
    tiles = tile_grid(truth.shape, tile_size=256, overlap=0.25)
    model = FakeModel(truth, img_size=256)
    seg = segment(coord_image(truth), model, channel_axis=0, normalize=False, tile_size=256)
    n = int(truth.max())
    assert straddling(truth, tiles) >= 20
    assert seg.stats["boxes"] >= 1.5 * n, seg.stats  # the detector sees many cells in two or more tiles ...
    assert seg.stats["decoded"] <= 1.25 * n, seg.stats  # ... but each about once (cut or near a split: twice)
    _check_one_to_one(truth, seg.labels, 0.99)
    every = segment(coord_image(truth), model, channel_axis=0, normalize=False, tile_size=256, decode_copies=True)
    assert every.stats["decoded"] == every.stats["boxes"] == seg.stats["boxes"]
    _check_one_to_one(truth, every.labels, 0.99)  # stitching removes the extra copies


def test_holding_tiles_prefers_the_widest_margin_then_the_largest_share() -> None:
    tiles = tile_grid((64, 100), tile_size=64, overlap=0.25)  # x0 = 0 and 36
    boxes = np.array([[40, 10, 50, 20],   # in both: 14 px from tile 0's right edge, 4 from tile 1's left
                      [50, 10, 60, 20],   # in both: margins 4 and 14
                      [60, 10, 70, 20],   # only in tile 1
                      [30, -5, 80, 20],   # in neither (above the image): tile 1 holds more of it
                      [0, 0, 0, 0]], np.float32)
    assert holding_tiles(boxes, tiles).tolist() == [0, 1, 1, 1, 0]
    assert holding_tiles(np.zeros((0, 4)), tiles).shape == (0,)
