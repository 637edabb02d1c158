"""SegmentParams: one frozen, self-validating parameter object, filled from the model in one place."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cellsam.config import InferenceConfig
from cellsam.inference.params import SegmentParams
from cellsam.inference.segment import segment
from cellsam.models.build import build_model
from tests.conftest import make_blobs


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(box_threshold=float("nan")), "box_threshold must be a finite number"),
        (dict(iou_threshold=float("inf")), "iou_threshold must be a finite number"),
        (dict(mask_threshold=1.0), "mask_threshold must be in"),
        (dict(precision="fp16"), "precision must be"),
        (dict(batch_size=0), "batch_size and decode_chunk"),
        (dict(decode_chunk=0), "batch_size and decode_chunk"),
        (dict(tile_size=8), "tile_size must be an integer"),
        (dict(tile_overlap=1.0), "tile_overlap must be in"),
        (dict(decode_window=-1.0), "decode_window must be"),
        (dict(diameter="big"), "diameter must be"),
        (dict(diameter=20, tile_size=256), "not both"),
        (dict(box_threshold_rel=1.0), "box_threshold_rel must be in"),
        (dict(box_threshold_rel=-0.1), "box_threshold_rel must be in"),
        (dict(box_threshold_rel=float("nan")), "box_threshold_rel must be in"),
        (dict(min_area_rel=1.0), "min_area_rel must be in"),
        (dict(min_area_rel=-0.1), "min_area_rel must be in"),
        (dict(min_area_rel=float("nan")), "min_area_rel must be in"),
    ],
)
def test_invalid_values_raise_when_made(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentParams(**bad)


def test_frozen_normalised_and_filled_from_the_model_in_one_place() -> None:
    p = SegmentParams(diameter="30", decode_window=0, batch_size=np.int64(2))
    assert p.diameter == 30.0 and p.decode_window is None and type(p.batch_size) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.min_area = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="fill them from the model"):
        p.model_values()
    inf = InferenceConfig(box_threshold=0.3, iou_threshold=0.6, mask_threshold=0.4, cell_diameter=15.0)
    f = p.filled_from(256, inf)
    assert f.filled and tuple(f.model_values()) == (256, 0.3, 0.6, 0.4, 0.0) and f.diameter == 30.0
    rel = dataclasses.replace(inf, box_threshold_rel=0.5)
    assert p.filled_from(256, rel).model_values().box_threshold_rel == 0.5  # the model's own
    assert p.replace(box_threshold_rel=0.0).filled_from(256, rel).box_threshold_rel == 0.0  # the user's: off
    assert SegmentParams(box_threshold=0.9).filled_from(128, inf).box_threshold == 0.9  # the user's value wins
    with pytest.raises(ValueError, match="has no cell diameter"):
        p.filled_from(256, InferenceConfig())
    # a tile far above the model's would shrink the image beyond the scales auto allows (and pad to huge arrays)
    assert SegmentParams(tile_size=1024).filled_from(256, inf).tile_size == 1024
    with pytest.raises(ValueError, match="at most 1024"):
        SegmentParams(tile_size=100_000).filled_from(256, inf)
    net = build_model("vit_tiny")
    got = SegmentParams().for_model(net)
    inf = net.cfg.inference
    assert got.model_values() == (net.cfg.tile_size, inf.box_threshold, inf.iou_threshold, inf.mask_threshold,
                                  inf.box_threshold_rel)


def test_params_argument_equals_the_keywords() -> None:
    net = build_model("vit_tiny").eval()
    img, _ = make_blobs((90, 100), n=6)
    kw = dict(box_threshold=0.0, iou_threshold=-1e9, tile_size=64, min_area=5)
    a = segment(img, net, **kw)
    b = segment(img, net, params=SegmentParams(**kw))
    assert np.array_equal(a.labels, b.labels) and a.n_cells == b.n_cells
    with pytest.raises(ValueError, match="not both"):
        segment(img, net, params=SegmentParams(**kw), min_area=3)
