"""polarity: the whole-cell channel inverted when the CellFinder is more confident so (light backgrounds only)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from cellsam.inference import polarity as P
from cellsam.inference.params import SegmentParams


def test_invert_whole_cell_inverts_the_blue_channel_only_and_copies() -> None:
    image = np.random.default_rng(0).random((3, 8, 9)).astype(np.float32)
    out = P.invert_whole_cell(image)
    np.testing.assert_array_equal(out[:2], image[:2])
    np.testing.assert_allclose(out[2], 1.0 - image[2])
    assert out is not image and not np.shares_memory(out, image) and out.dtype == np.float32


def test_bright_background_is_the_blue_channels_median() -> None:
    image = np.zeros((3, 20, 20), np.float32)
    image[2, 5:9, 5:9] = 1.0  # bright cells on black (fluorescence)
    assert not P.bright_background(image)
    assert P.bright_background(P.invert_whole_cell(image))  # dark cells on white
    image[1] = 1.0  # a bright nuclear channel does not count
    assert not P.bright_background(image)


class _StubNet:
    """Detections whose scores depend on a tile's blue mean: dark tiles (cells bright on black) give
    ``dark``, light ones ``light``. Counts the encoder passes."""

    img_size = 32

    def __init__(self, dark: list[float], light: list[float]) -> None:
        self.dark, self.light, self.passes = dark, light, 0
        self.flip_tests: list[str | bool | None] = []

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.passes += x.shape[0]
        return x

    def detect(self, enc: torch.Tensor, x: torch.Tensor, *, flip_test: str | bool | None = None) -> torch.Tensor:
        self.flip_tests.append(flip_test)
        return enc[:, 2].mean(dim=(1, 2))

    def postprocess_detections(self, means: torch.Tensor, *, box_threshold: float) -> list[dict[str, torch.Tensor]]:
        out = []
        for m in means.tolist():
            s = torch.tensor(self.dark if m < 0.5 else self.light)
            out.append({"scores": s[s > box_threshold]})
        return out


def _light_image(side: int = 64) -> np.ndarray:
    image = np.full((3, side, side), 0.8, np.float32)
    image[0] = image[1] = 0.0
    image[2, 10:20, 10:20] = 0.1  # a dark cell
    return image


def test_detection_confidence_is_the_upper_half_mean_over_a_few_tiles() -> None:
    net = _StubNet(dark=[0.9, 0.7, 0.5, 0.1], light=[0.4, 0.3])
    dev = torch.device("cpu")
    # a 64 px image at 16 px tiles: 16 tiles, of which PROBE_TILES are looked at, each resized to 32
    conf = P.detection_confidence(net, _light_image(), 16, dev, box_threshold=0.2)
    assert net.passes == P.PROBE_TILES
    assert net.flip_tests == ["off"]  # the rule was measured on the one view's scores, not the flip test's
    # per tile [0.4, 0.3] above 0.2 -> 4 x 2 scores; the upper half is the four 0.4s
    assert conf == pytest.approx(0.4)
    inv = P.detection_confidence(net, P.invert_whole_cell(_light_image()), 16, dev, box_threshold=0.2)
    assert inv == pytest.approx(np.mean([0.9] * 4 + [0.7] * 2))  # 12 scores: 4x 0.9, 0.7, 0.5; upper 6
    assert P.detection_confidence(net, np.zeros((3, 64, 64), np.float32), 16, dev, 0.2) == 0.0  # blank
    assert P.detection_confidence(_StubNet([0.1], [0.1]), _light_image(), 16, dev, 0.2) == 0.0  # no box


def test_prefers_inverted_only_checks_light_backgrounds() -> None:
    dev = torch.device("cpu")
    net = _StubNet(dark=[0.9], light=[0.4])
    assert P.prefers_inverted(net, _light_image(), 16, dev, 0.2)  # inverted tiles are dark: 0.9 > 0.4
    net = _StubNet(dark=[0.3], light=[0.6])
    assert not P.prefers_inverted(net, _light_image(), 16, dev, 0.2)
    net = _StubNet(dark=[0.1], light=[0.9])  # would prefer the inverted dark image, but it is not checked
    dark = P.invert_whole_cell(_light_image())
    assert not P.prefers_inverted(net, dark, 16, dev, 0.2) and net.passes == 0


def test_segment_params_and_cli_take_polarity() -> None:
    from cellsam.cli.segment import add_parser, params_of

    assert SegmentParams().polarity == "auto"
    assert SegmentParams(polarity="inverted").polarity == "inverted"
    with pytest.raises(ValueError, match="polarity must be one of"):
        SegmentParams(polarity="dark")
    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers())
    assert params_of(ap.parse_args(["segment", "--polarity", "as_is"])).polarity == "as_is"
    assert params_of(ap.parse_args(["segment"])).polarity == "auto"
    with pytest.raises(SystemExit):
        ap.parse_args(["segment", "--polarity", "dark"])


@pytest.fixture(scope="module")
def sample_both_ways():  # type: ignore[no-untyped-def]
    """The bundled sample (bright nuclei on black) and its negative (dark nuclei on white, as in bright
    field), with the default model's segmentation of the sample as it is."""
    import cellsam
    from cellsam.cli.segment import sample_path
    from cellsam.io import load_image
    from cellsam.weights import load_model

    net = load_model("default")
    image = load_image(sample_path()).data
    negative = image.max() - image
    return net, image, negative, cellsam.segment(image, net)


def _f1(a: np.ndarray, b: np.ndarray) -> float:
    from cellsam.eval.matching import label_overlap, match_objects

    return match_objects(label_overlap(a, b), threshold=0.5).f1


def test_auto_polarity_segments_a_negative_as_the_positive(sample_both_ways) -> None:  # type: ignore[no-untyped-def]
    """The sample's negative: "auto" inverts it back and finds the sample's cells; "as_is" finds fewer of
    them (v6 found almost none; v10, trained with stained pictures as hematoxylin, finds most: F1 0.87
    against auto's 1.0)."""
    import cellsam

    net, image, negative, reference = sample_both_ways
    assert not reference.inverted and reference.n_cells >= 20
    auto = cellsam.segment(negative, net)
    assert auto.inverted
    assert _f1(reference.labels, auto.labels) >= 0.8, (auto.n_cells, reference.n_cells)
    as_is = cellsam.segment(negative, net, polarity="as_is")
    assert not as_is.inverted and _f1(reference.labels, as_is.labels) < _f1(reference.labels, auto.labels)
    forced = cellsam.segment(image, net, polarity="inverted")  # forcing the wrong way is obeyed
    assert forced.inverted and _f1(reference.labels, forced.labels) < _f1(reference.labels, auto.labels)


def test_predictor_takes_a_polarity(sample_both_ways) -> None:  # type: ignore[no-untyped-def]
    """Predictor.set_image(polarity="auto") inverts the negative and finds the sample's boxes; the default
    ("as_is", SAM's behaviour) and a uint8 image with normalize=False keep the image as given."""
    from cellsam.inference.predictor import Predictor
    from cellsam.ops.boxes import box_iou

    net, image, negative, _ = sample_both_ways
    p = Predictor(net)
    p.set_image(image)
    ref, _ = p.detect()
    assert not p.inverted and len(ref) >= 20

    def matched(boxes: np.ndarray) -> int:
        iou = box_iou(torch.as_tensor(boxes), torch.as_tensor(ref))
        return int((iou.max(dim=1).values >= 0.5).sum()) if len(boxes) else 0

    p.set_image(negative, polarity="auto")
    auto, _ = p.detect()
    assert p.inverted and matched(auto) >= 0.8 * len(ref)
    p.set_image(negative)
    as_is, _ = p.detect()
    assert not p.inverted and matched(as_is) < matched(auto)
    p.set_image(image, polarity="inverted")
    assert p.inverted
    with pytest.raises(ValueError, match="polarity must be one of"):
        p.set_image(image, polarity="dark")
    rgb = np.repeat((negative / negative.max() * 255).astype(np.uint8)[..., None], 3, axis=-1)
    with pytest.raises(ValueError, match="polarity needs CellSAM's layout"):
        p.set_image(rgb, channel_axis=-1, normalize=False, polarity="auto")
