"""Interactive Predictor: shapes, errors, one encoder pass, and parity with segment_anything.SamPredictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsam.inference.predictor import Predictor, resized_shape
from cellsam.models.build import build_model
from cellsam.weights import load_model
from tests.conftest import make_blobs


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


@pytest.fixture(scope="module")
def image():
    img, _ = make_blobs((50, 80), n=6, radius=(4, 7))
    return img


def test_use_before_set_image_is_a_clear_error(tiny, image):
    p = Predictor(tiny)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(box=np.array([0, 0, 10, 10]))
    with pytest.raises(RuntimeError, match="set_image"):
        p.detect()
    p.set_image(image)
    assert p.is_image_set
    p.reset_image()
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(box=np.array([0, 0, 10, 10]))
    with pytest.raises(TypeError, match="CellSAM"):
        Predictor(torch.nn.Linear(2, 2))


def test_bad_prompts(tiny, image):
    p = Predictor(tiny)
    p.set_image(image)
    with pytest.raises(ValueError, match="at least one prompt"):
        p.predict()
    with pytest.raises(ValueError, match="together"):
        p.predict(point_coords=np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="P >= 1"):  # no point at all: a clear message, not a reshape error
        p.predict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0))
    with pytest.raises(ValueError, match="box must be"):
        p.predict(box=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="mask_input must be"):
        p.predict(box=np.array([1.0, 2.0, 9.0, 9.0]), mask_input=np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        p.predict(box=np.array([1.0, np.nan, 9.0, 9.0]))
    with pytest.raises(ValueError, match="channel_axis"):
        p.set_image(np.zeros((50, 80, 3), np.uint8))


def test_shapes(tiny, image):
    p = Predictor(tiny)
    p.set_image(image)
    h, w = image.shape
    lo = tiny.low_res_size
    masks, scores, low = p.predict(point_coords=np.array([[20.0, 10.0], [60, 40]]), point_labels=np.array([1, 0]))
    assert masks.shape == (3, h, w) and masks.dtype == bool
    assert scores.shape == (3,) and low.shape == (3, lo, lo)
    masks, scores, low = p.predict(box=np.array([5.0, 5.0, 30.0, 40.0]), multimask_output=False, return_logits=True)
    assert masks.shape == (1, h, w) and masks.dtype == np.float32 and scores.shape == (1,)
    masks2, _, _ = p.predict(box=np.array([5.0, 5.0, 30.0, 40.0]), mask_input=low[:1], multimask_output=False)
    assert masks2.shape == (1, h, w)
    boxes = np.array([[5.0, 5.0, 30.0, 40.0], [40, 10, 70, 45], [0, 0, 80, 50]])
    masks, scores, low = p.predict(box=boxes)
    assert masks.shape == (3, 3, h, w) and scores.shape == (3, 3) and low.shape == (3, 3, lo, lo)
    # batched boxes decode as the same boxes one at a time
    single = p.predict(box=boxes[1], return_logits=True)[0]
    batched = p.predict(box=boxes, return_logits=True)[0][1]
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # one point set shared by all boxes
    masks, _, _ = p.predict(point_coords=np.array([[20.0, 20.0]]), point_labels=np.array([1]), box=boxes)
    assert masks.shape == (3, 3, h, w)


@pytest.mark.parametrize("variant", ["vit_tiny", "conv_tiny"])  # Anchor DETR and the dense CellFinder
def test_detect_uses_cached_features_and_original_pixels(variant, image, monkeypatch):
    torch.manual_seed(0)
    tiny = build_model(variant).eval()
    p = Predictor(tiny)
    calls = {"encode": 0}
    real_encode = tiny.encode

    def counting(x):
        calls["encode"] += 1
        return real_encode(x)

    monkeypatch.setattr(tiny, "encode", counting)
    p.set_image(image)
    boxes, scores = p.detect(box_threshold=0.0)
    p.predict(box=np.array([5.0, 5.0, 30.0, 40.0]))
    boxes_hi, scores_hi = p.detect(box_threshold=float(np.median(scores)))
    assert calls["encode"] == 1
    h, w = image.shape
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) == len(scores) > 0
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 3] <= h).all() and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ((scores > 0) & (scores <= 1)).all() and (np.diff(scores) <= 0).all()
    assert 0 < len(scores_hi) < len(scores)
    with pytest.raises(ValueError, match="box_threshold"):
        p.detect(box_threshold=1.5)


def test_resized_shape_is_sams():
    from segment_anything.utils.transforms import ResizeLongestSide

    for h, w in [(50, 80), (1000, 7), (333, 333), (97, 1024)]:
        assert resized_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)


# ------------------------------------------------------------------ parity with segment_anything
def _random_sam(**kwargs):
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    sam = _build_sam(checkpoint=None, **kwargs)
    with torch.no_grad():  # Meta zero-initialises positions; perturb everything so every weight matters
        for prm in sam.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    return sam.eval()


def _check_parity(sam, tmp_path, img: np.ndarray) -> None:
    from segment_anything import SamPredictor

    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    ours = Predictor(load_model(tmp_path / "sam.pth"))
    ours.set_image(img, channel_axis=-1, normalize=False)
    ref = SamPredictor(sam)
    ref.set_image(img)
    assert ours.input_size == tuple(ref.input_size) and ours.original_size == tuple(ref.original_size)
    torch.testing.assert_close(ours._features.embedding, ref.features, atol=1e-4, rtol=0)
    h, w = img.shape[:2]
    pts, lab = np.array([[0.3 * w, 0.4 * h], [0.7 * w, 0.6 * h]]), np.array([1, 0])
    box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h])
    cases = [
        dict(point_coords=pts, point_labels=lab, multimask_output=True),
        dict(point_coords=pts[:1], point_labels=lab[:1], multimask_output=False),
        dict(box=box, multimask_output=True),
        dict(box=box, multimask_output=False),
        dict(point_coords=pts, point_labels=lab, box=box, multimask_output=True),
    ]
    for kw in cases:
        a = ref.predict(**kw, return_logits=True)
        b = ours.predict(**kw, return_logits=True)
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape
            np.testing.assert_allclose(y, x, atol=1e-4, rtol=0, err_msg=str(kw))
        m_ref = ref.predict(**kw)[0]
        m_ours = ours.predict(**kw)[0]
        assert m_ours.dtype == bool and (m_ref != m_ours).mean() < 1e-4
    low = ref.predict(box=box, multimask_output=False)[2]
    a = ref.predict(box=box, mask_input=low, multimask_output=False, return_logits=True)
    b = ours.predict(box=box, mask_input=low, multimask_output=False, return_logits=True)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, atol=1e-4, rtol=0)


def _rgb(h: int, w: int) -> np.ndarray:
    blobs, _ = make_blobs((h, w), n=8, radius=(5, 12), seed=3)
    rng = np.random.default_rng(1)
    rgb = np.stack([blobs, blobs * 0.5, rng.random((h, w))], axis=-1)
    return (rgb * 255).astype(np.uint8)


def test_parity_with_sam_predictor_small(tmp_path):
    sam = _random_sam(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1])
    _check_parity(sam, tmp_path, _rgb(96, 128))


@pytest.mark.slow
def test_parity_with_sam_predictor_vit_b(tmp_path):
    sam = _random_sam(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                      encoder_global_attn_indexes=[2, 5, 8, 11])
    _check_parity(sam, tmp_path, _rgb(120, 90))


def test_set_image_warns_when_the_image_shrinks_far_below_the_models_scale(tiny, image, caplog):
    from cellsam.models.protocol import model_tile_size

    p = Predictor(tiny)
    with caplog.at_level("WARNING", logger="cellsam.inference.predictor"):
        p.set_image(image)  # smaller than a tile: shown at least at the model's scale
        assert not caplog.records
        side = 3 * model_tile_size(tiny)
        big, _ = make_blobs((side, side), n=20, radius=(4, 7))
        p.set_image(big)
    assert len(caplog.records) == 1 and "0.33x the scale" in caplog.text and "cellsam.segment" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cellsam.inference.predictor"):
        p.set_image(big, check_scale=False)  # a caller that cut the image at a chosen scale
    assert not caplog.records


def test_session_tiles_at_a_large_scale_do_not_warn(tiny, caplog):
    """The web app's tiles are cut at the image's scale: their shrink to the model input is the rescaling."""
    from cellsam.models.protocol import model_tile_size
    from cellsam.server.session import ModelSession

    side = 3 * model_tile_size(tiny)
    big, _ = make_blobs((side, side), n=20, radius=(12, 20))
    image = np.stack([np.zeros_like(big), big, big]).astype(np.float32)
    session = ModelSession(tiny)
    with caplog.at_level("WARNING", logger="cellsam.inference.predictor"):
        session.predict("k", image, box=(10, 10, 60, 60), tile_size=side)
    assert not caplog.records
