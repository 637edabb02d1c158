"""cellsam.segment end to end: the real vit_tiny model (shapes only, random weights) and the exact
FakeModel of tests/test_tiling.py (thresholds, empty images, batches)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cellsam
from cellsam.inference.preprocess import prepare_image
from cellsam.inference.segment import Segmentation, segment
from cellsam.models.build import build_model
from tests.conftest import make_blobs
from tests.test_tiling import FakeModel, coord_image, match_ious, random_cells

# random weights score every box at ~0.01 and predict IoUs around 0.2: open the gates to get cells
OPEN = {"box_threshold": 0.0, "iou_threshold": -1e9}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


def _check_consistent(seg: Segmentation, shape: tuple[int, int], min_area: int) -> None:
    n = seg.n_cells
    assert seg.labels.shape == shape and seg.labels.dtype == np.int32
    assert seg.boxes.shape == (n, 4) and seg.boxes.dtype == np.float32
    assert seg.scores.shape == (n,) and seg.ious.shape == (n,) and seg.scores.dtype == np.float32
    assert int(seg.labels.max()) == n and set(np.unique(seg.labels)) <= set(range(n + 1))
    areas = np.bincount(seg.labels.ravel(), minlength=n + 1)[1:]
    assert (areas >= min_area).all()
    assert (np.diff(seg.scores) <= 0).all()  # labels numbered by descending score


def test_vit_tiny_end_to_end_shapes(tiny: torch.nn.Module) -> None:
    img, _ = make_blobs((100, 130), n=8)
    seg = segment(img, tiny, tile_size=64, return_masks=True, min_area=15, **OPEN)
    _check_consistent(seg, (100, 130), 15)
    assert seg.n_cells > 0 and seg.message == ""
    assert seg.stats["tiles"] == 6 and seg.stats["boxes"] > 0
    assert len(seg.masks) == seg.n_cells
    for k, cm in enumerate(seg.masks, start=1):
        full = cm.to_full(seg.labels.shape)
        assert full[seg.labels == k].all()  # the merged label lies inside its pre-merge mask
    assert (seg.boxes[:, 2] > seg.boxes[:, 0]).all() and seg.boxes.min() >= 0
    assert seg.boxes[:, [0, 2]].max() <= 130 and seg.boxes[:, [1, 3]].max() <= 100  # clipped to the image


def test_vit_tiny_default_thresholds_give_no_cells_and_a_message(tiny: torch.nn.Module) -> None:
    img, _ = make_blobs((70, 70), n=4)
    seg = segment(img, tiny, tile_size=64)
    assert seg.n_cells == 0 and seg.labels.max() == 0 and seg.labels.shape == (70, 70)
    assert "no cells found" in seg.message and "box_threshold=0.4" in seg.message
    for const in (np.zeros((50, 60), np.uint16), np.full((50, 60), 3.5)):  # empty / constant images
        seg = segment(const, tiny, tile_size=64, **OPEN)
        assert seg.labels.shape == (50, 60) and isinstance(seg.message, str)


def test_raw_input_equals_prepared_input(tiny: torch.nn.Module) -> None:
    img, _ = make_blobs((80, 90), n=6)
    raw = (img * 4000).astype(np.uint16)
    a = segment(raw, tiny, tile_size=64, **OPEN)
    b = segment(prepare_image(raw), tiny, channel_axis=0, normalize=False, tile_size=64, **OPEN)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.scores, b.scores)


def test_lists_batches_and_layouts(tiny: torch.nn.Module) -> None:
    img, _ = make_blobs((64, 72), n=5)
    out = segment([img, img[:50, :60]], tiny, tile_size=64, **OPEN)
    assert isinstance(out, list) and [s.labels.shape for s in out] == [(64, 72), (50, 60)]
    batch = np.stack([img, img[::-1]])
    out = segment(batch, tiny, batch=True, tile_size=64, **OPEN)
    assert len(out) == 2 and out[0].labels.shape == (64, 72)
    np.testing.assert_array_equal(out[0].labels, segment(img, tiny, tile_size=64, **OPEN).labels)
    two = np.stack([img, np.roll(img, 2, axis=0)], axis=-1)  # (H, W, 2) nuclear + whole-cell
    seg = segment(two, tiny, channel_axis=-1, channels=(0, 1), tile_size=64, **OPEN)
    assert seg.labels.shape == (64, 72)
    with pytest.raises(ValueError, match="channel_axis"):
        segment(two, tiny)
    with pytest.raises(ValueError, match="batch=True"):
        segment([img], tiny, batch=True)


def test_model_given_as_checkpoint_path(tiny: torch.nn.Module, tmp_path) -> None:
    from cellsam.weights import save_model

    path = save_model(tiny, tmp_path / "tiny", version="test")
    img, _ = make_blobs((64, 64), n=4)
    a = segment(img, str(path), tile_size=64, device="cpu", **OPEN)
    b = segment(img, tiny, tile_size=64, **OPEN)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_bad_model_device_and_parameters(tiny: torch.nn.Module) -> None:
    img = np.zeros((32, 32), np.float32)
    with pytest.raises(TypeError, match="model must be"):
        segment(img, object())
    with pytest.raises(FileNotFoundError):
        segment(img, "/nonexistent/model.safetensors")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            segment(img, tiny, device="cuda")
    for kw in ({"mask_threshold": 1.0}, {"tile_size": 4}, {"tile_overlap": 1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            segment(img, tiny, **kw)


# ---------------------------------------------------------------- exact behaviour with the fake model
@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return random_cells((150, 170), n=25, radius=(4, 12), seed=7)


def test_thresholds_drop_exactly_the_right_cells(scene: np.ndarray) -> None:
    ids = np.arange(1, scene.max() + 1)
    low_score = set(ids[::4].tolist())
    low_iou = set(ids[1::5].tolist())
    fake = FakeModel(scene, 128, score=lambda i: 0.3 if i in low_score else 0.8,
                     iou=lambda i: 0.2 if i in low_iou else 0.9)
    seg = segment(coord_image(scene), fake, channel_axis=0, normalize=False, tile_size=128, min_area=1)
    iou = match_ious(scene, seg.labels)
    found = {int(i) + 1 for i in np.flatnonzero(iou.max(1) > 0.95)}
    assert found == set(ids.tolist()) - low_score - low_iou
    assert seg.n_cells == len(found)
    np.testing.assert_allclose(seg.scores, 0.8)
    np.testing.assert_allclose(seg.ious, 0.9)
    # min_area: the cells smaller than 100 px disappear, the others stay
    areas = np.bincount(scene.ravel())[1:]
    seg = segment(coord_image(scene), FakeModel(scene, 128), channel_axis=0, normalize=False, tile_size=128,
                  min_area=100)
    assert seg.n_cells == int((areas >= 100).sum())


def test_mask_threshold_is_a_probability(scene: np.ndarray) -> None:
    fake = FakeModel(scene, 128)  # logits are +-8, i.e. probabilities 0.9997 / 0.0003
    seg = segment(coord_image(scene), fake, channel_axis=0, normalize=False, tile_size=128, mask_threshold=0.9)
    assert seg.n_cells == scene.max()
    seg = segment(coord_image(scene), fake, channel_axis=0, normalize=False, tile_size=128,
                  mask_threshold=0.99999)
    assert seg.n_cells == 0 and "no cells found" in seg.message


def test_no_cells_in_an_empty_scene() -> None:
    empty = np.zeros((90, 100), np.int32)
    seg = segment(coord_image(empty), FakeModel(empty, 64), channel_axis=0, normalize=False, tile_size=64)
    assert seg.n_cells == 0 and seg.labels.shape == (90, 100) and seg.labels.max() == 0
    assert seg.boxes.shape == (0, 4) and "0 box(es)" in seg.message


def test_bf16_autocast_runs_and_stays_close_to_fp32(tiny: torch.nn.Module) -> None:
    img, _ = make_blobs((100, 130), n=8)
    a = segment(img, tiny, tile_size=64, **OPEN)
    b = segment(img, tiny, tile_size=64, precision="bf16", **OPEN)
    assert b.labels.dtype == np.int32 and b.labels.shape == a.labels.shape
    # same detections (same queries pass an open threshold); masks differ by bf16 rounding only
    assert abs(a.n_cells - b.n_cells) <= max(2, a.n_cells // 5)
    with pytest.raises(ValueError, match="precision"):
        segment(img, tiny, precision="fp16")


def test_default_tile_size_is_the_models_own(tiny: torch.nn.Module) -> None:
    img, _ = make_blobs((100, 130), n=8)
    seg = segment(img, tiny, **OPEN)
    assert seg.stats["tiles"] == 6  # vit_tiny's cfg.tile_size is 64: 2 x 3 tiles of 64 at 25% overlap


def test_thresholds_default_to_the_models_own() -> None:
    from cellsam.config import InferenceConfig

    torch.manual_seed(0)
    model = build_model("vit_tiny").eval()
    img, _ = make_blobs((100, 130), n=8)
    paper = segment(img, model, tile_size=64)  # random weights: nothing passes 0.4 / 0.5
    assert paper.n_cells == 0
    model.cfg = model.cfg.replace(inference=InferenceConfig(box_threshold=0.0, iou_threshold=-1e9))
    own = segment(img, model, tile_size=64)
    explicit = segment(img, model, tile_size=64, **OPEN)
    assert own.n_cells > 0
    np.testing.assert_array_equal(own.labels, explicit.labels)
    # an explicit argument still wins over the model's value
    assert segment(img, model, tile_size=64, box_threshold=0.99).n_cells == 0


def test_box_refinement_decodes_again_with_the_masks_box() -> None:
    """decode_refined: round 2 prompts with the bounding box of round 1's mask (low-res pixels scaled to
    the model input); a box whose mask is empty is kept; rounds=0 is a single decode."""
    from cellsam.inference.segment import decode_refined

    class FakeNet:
        img_size = 64
        calls: list[torch.Tensor] = []

        def decode(self, embedding, *, boxes, multimask_output, chunk_size):  # noqa: ANN001, ANN202
            self.calls.append(boxes.clone())
            lo = torch.full((boxes.shape[0], 1, 16, 16), -10.0)
            lo[0, 0, 2:6, 3:9] = 5.0  # prompt 0: a cell at rows 2-5, cols 3-8 of the 16x16 grid
            return lo, torch.ones(boxes.shape[0], 1)

    net = FakeNet()
    boxes = torch.tensor([[0.0, 0.0, 60.0, 60.0], [10.0, 10.0, 20.0, 20.0]])
    lo, iou = decode_refined(net, torch.zeros(1, 8, 4, 4), boxes, thr=0.0, rounds=1, chunk_size=None)
    assert len(net.calls) == 2 and lo.shape == (2, 1, 16, 16)
    assert net.calls[1][0].tolist() == [12.0, 8.0, 36.0, 24.0]  # (3, 2, 9, 6) x 64/16
    assert net.calls[1][1].tolist() == boxes[1].tolist()  # empty mask: box unchanged
    net.calls.clear()
    decode_refined(net, torch.zeros(1, 8, 4, 4), boxes, thr=0.0, rounds=0, chunk_size=None)
    assert len(net.calls) == 1


def test_refine_boxes_travels_with_the_model_and_changes_the_decoding(tiny: torch.nn.Module) -> None:
    import dataclasses

    img, _ = make_blobs((64, 64), n=4)
    net = copy.deepcopy(tiny)
    calls = []
    orig = net.decode
    net.decode = lambda *a, **k: calls.append(1) or orig(*a, **k)  # type: ignore[method-assign]
    open_kw = dict(box_threshold=0.0, iou_threshold=-1e9, tile_size=64)
    cellsam.segment(img, net, **open_kw)
    n0 = len(calls)
    net.cfg = net.cfg.replace(inference=dataclasses.replace(net.cfg.inference, refine_boxes=1))
    calls.clear()
    cellsam.segment(img, net, **open_kw)
    assert n0 >= 1 and len(calls) == 2 * n0


def test_decode_window_reaches_every_refinement_round_and_is_validated() -> None:
    from cellsam.inference.segment import decode_refined

    class FakeNet:
        img_size = 64
        windows: list[float | None] = []

        def decode(self, embedding, *, boxes, multimask_output, chunk_size, window=None):  # noqa: ANN001, ANN202
            self.windows.append(window)
            lo = torch.full((boxes.shape[0], 1, 16, 16), -10.0)
            lo[:, 0, 2:6, 3:9] = 5.0
            return lo, torch.ones(boxes.shape[0], 1)

    net = FakeNet()
    boxes = torch.tensor([[0.0, 0.0, 60.0, 60.0]])
    decode_refined(net, torch.zeros(1, 8, 4, 4), boxes, thr=0.0, rounds=2, chunk_size=None, window=2.5)
    assert net.windows == [2.5, 2.5, 2.5]
    img = np.zeros((32, 32), np.float32)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="decode_window"):
            segment(img, "vit_tiny", decode_window=bad)

