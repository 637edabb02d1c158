"""Any magnification: diameter estimation, the scale's tile size, and segment(diameter=...)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from skimage.draw import disk
from skimage.transform import rescale

from cellsam.config import check_diameter
from cellsam.inference.scale import (
    MAX_SCALE,
    MIN_MEASURED_CELLS,
    median_diameter,
    needs_rescale,
    rescale_from_cells,
    tile_size_for,
)


def disc_scene(diameter: float, n: int = 12, size: int = 256, seed: int = 0) -> np.ndarray:
    """(size, size) labels of n non-overlapping discs of the given diameter on a grid, jittered."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    side = int(np.ceil(np.sqrt(n)))
    pitch = size / side
    for k in range(n):
        cy, cx = (k // side + 0.5) * pitch, (k % side + 0.5) * pitch
        jitter = max(0.0, (pitch - diameter) / 2 - 1)
        cy, cx = cy + rng.uniform(-jitter, jitter), cx + rng.uniform(-jitter, jitter)
        labels[disk((cy, cx), diameter / 2, shape=labels.shape)] = k + 1
    return labels


@pytest.mark.parametrize("d", [6.0, 15.0, 40.0])
def test_median_diameter_of_known_discs(d: float) -> None:
    labels = disc_scene(d, n=9 if d > 30 else 16)
    est = median_diameter(labels)
    assert est is not None and abs(est - d) <= 0.1 * d + 0.5
    assert median_diameter(np.zeros((8, 8), np.int32)) is None


def test_tile_size_for_scales_and_clamps() -> None:
    assert tile_size_for(256, 20.0, 20.0) == 256
    assert tile_size_for(256, 20.0, 40.0) == 512  # cells twice the model's size: twice the tile, halved
    assert tile_size_for(256, 20.0, 10.0) == 128
    assert tile_size_for(256, 20.0, 1000.0) == int(256 * MAX_SCALE)
    assert tile_size_for(256, 20.0, 0.5) == 64  # clamped to 1 / MAX_SCALE
    with pytest.raises(ValueError):
        tile_size_for(256, 0.0, 10.0)
    assert not needs_rescale(22.0, 20.0) and needs_rescale(40.0, 20.0) and needs_rescale(10.0, 20.0)
    assert not needs_rescale(None, 20.0)


def test_cells_of_a_pass_ask_for_their_scale() -> None:
    """A pass's cells keep its tile when they are near its scale and ask for theirs when not."""
    at_20, at_40 = disc_scene(20.0, n=16, size=512), disc_scene(40.0, n=16, size=512)
    tile, measured = rescale_from_cells(at_20, 256, 20.0, 256)
    assert tile == 256 and measured is not None and abs(measured - 20.0) < 2.0
    assert rescale_from_cells(at_20, 256, 20.0, 280)[0] == 280  # 256 wanted: within the tolerance of 280
    assert rescale_from_cells(at_20, 256, 20.0, 512)[0] == 256  # a pass at twice the scale: back to 256
    tile, measured = rescale_from_cells(at_40, 256, 20.0, 256)
    assert measured is not None and abs(measured - 40.0) < 3.0 and abs(tile - 512) <= 30
    few = disc_scene(40.0, n=MIN_MEASURED_CELLS - 1, size=512)
    assert rescale_from_cells(few, 256, 20.0, 256) == (256, None)
    assert rescale_from_cells(np.zeros((64, 64), np.int32), 256, 20.0, 100) == (100, None)


@pytest.mark.parametrize("bad", [0, -3, float("nan"), float("inf"), "big", True, np.bool_(True), np.float32(-2)])
def test_check_diameter_rejects_what_is_not_a_size(bad: object) -> None:
    with pytest.raises(ValueError, match="diameter"):
        check_diameter(bad)  # type: ignore[arg-type]
    assert check_diameter("auto") == "auto" and check_diameter(None) is None and check_diameter("12") == 12.0
    # numpy scalars (a diameter measured with numpy) are numbers too
    assert check_diameter(np.float32(30.5)) == 30.5 and check_diameter(np.int64(30)) == 30.0
    assert type(check_diameter(np.float32(30.5))) is float


@pytest.fixture(scope="module")
def sized():  # type: ignore[no-untyped-def]
    """The default model with a size reference of 20 px (v4's own is ~28 px)."""
    from cellsam.weights import load_model

    model = load_model("default")
    model.cfg = model.cfg.replace(inference=dataclasses.replace(model.cfg.inference, cell_diameter=20.0))
    return model


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    from cellsam.cli.segment import sample_path
    from cellsam.io import load_image

    return load_image(sample_path()).data


def test_diameter_is_the_tile_size_of_its_scale(sized, sample: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    import cellsam

    by_diameter = cellsam.segment(sample, sized, diameter=30.0)
    by_tile = cellsam.segment(sample, sized, tile_size=tile_size_for(sized.cfg.tile_size, 20.0, 30.0))
    assert by_diameter.tile_size == 384 and by_diameter.diameter == 30.0
    assert by_diameter.labels.shape == sample.shape[:2]
    np.testing.assert_array_equal(by_diameter.labels, by_tile.labels)
    with pytest.raises(ValueError, match="not both"):
        cellsam.segment(sample, sized, diameter=30.0, tile_size=256)


def test_diameter_needs_a_model_with_a_size_reference(sample: np.ndarray) -> None:
    """A diameter in pixels needs the model's size reference; "auto" (the default) then keeps the image's
    own scale, and a given tile size sets the scale instead of the default "auto"."""
    import cellsam
    from cellsam.weights import load_model

    model = load_model("default")
    model.cfg = model.cfg.replace(inference=dataclasses.replace(model.cfg.inference, cell_diameter=None))
    with pytest.raises(ValueError, match="no cell diameter"):
        cellsam.segment(sample[:64, :64], model, diameter=20)
    seg = cellsam.segment(sample, model, diameter="auto")
    assert seg.tile_size == model.cfg.tile_size and seg.diameter is None
    sized = load_model("default")
    by_tile = cellsam.segment(sample, sized, tile_size=300)  # diameter left at its default "auto"
    assert by_tile.tile_size == 300 and by_tile.diameter is None


def test_auto_diameter_from_a_first_pass_follows_the_magnification(sized, sample: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """A model without a size model: auto measures the cells of a first pass. The sample at 1x and
    halved: the estimate halves too, the halved image is segmented on its own grid, and about the same
    cells are found (none lost or merged at the rescale)."""
    import copy

    import cellsam

    sized = copy.deepcopy(sized)
    sized.size_head = None  # v4 has a size model; without one, auto measures a first pass
    native = cellsam.segment(sample, sized, diameter="auto")
    small_image = rescale(sample.astype(np.float32), 0.5, order=1,
                          channel_axis=-1 if sample.ndim == 3 else None, preserve_range=True)
    small = cellsam.segment(small_image, sized, diameter="auto")
    assert native.diameter is not None and small.diameter is not None
    assert 1.4 <= native.diameter / small.diameter <= 2.6, (native.diameter, small.diameter)
    assert small.labels.shape == small_image.shape[:2]
    assert native.tile_size is not None and small.tile_size is not None and small.tile_size < native.tile_size
    assert abs(small.n_cells - native.n_cells) <= max(4, 0.2 * native.n_cells), (small.n_cells, native.n_cells)


@pytest.mark.parametrize("wrong", [0.4, 2.5])
def test_auto_mends_a_wrong_size_estimate_with_its_cells(sized, sample: np.ndarray, wrong: float,  # type: ignore[no-untyped-def]
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """When the size model is off by 2.5x either way, the first pass's cells set the scale: the image is
    segmented again near the scale of a right estimate, with about the same cells."""
    import cellsam
    import cellsam.inference.scale as scale

    right = cellsam.segment(sample, sized, diameter="auto")
    assert right.diameter is not None and right.tile_size is not None
    true_estimate = scale.estimate_diameter
    monkeypatch.setattr(scale, "estimate_diameter", lambda *a: wrong * true_estimate(*a))
    mended = cellsam.segment(sample, sized, diameter="auto")
    assert mended.tile_size is not None and mended.diameter is not None
    assert max(mended.tile_size, right.tile_size) <= 1.3 * min(mended.tile_size, right.tile_size)
    assert abs(mended.diameter / right.diameter - 1.0) < 0.3
    assert abs(mended.n_cells - right.n_cells) <= max(3, 0.15 * right.n_cells), (mended.n_cells, right.n_cells)


def test_command_line_diameter_and_tile_size_set_one_scale() -> None:
    import argparse

    from cellsam.cli import build_parser
    from cellsam.cli.segment import diameter_of
    from cellsam.config import DEFAULT_DIAMETER

    parser = build_parser()
    args = parser.parse_args(["segment", "x.tif", "--diameter", "30"])
    assert diameter_of(args) == 30.0
    assert diameter_of(parser.parse_args(["segment", "x.tif", "--diameter", "auto"])) == "auto"
    assert diameter_of(parser.parse_args(["segment", "x.tif", "--diameter", "none"])) is None
    assert diameter_of(parser.parse_args(["segment", "x.tif"])) == DEFAULT_DIAMETER
    assert diameter_of(parser.parse_args(["segment", "x.tif", "--tile-size", "512"])) is None
    with pytest.raises(ValueError, match="both set the scale"):
        diameter_of(parser.parse_args(["segment", "x.tif", "--tile-size", "512", "--diameter", "20"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "x.tif", "--diameter", "-4"])
    assert isinstance(args, argparse.Namespace)
