"""diameter="auto" on images too large to hold: the scale measured on a few windows (sample_scale)."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam.distributed.sample_scale import measure_scale, signal_windows, weighted_median_scale
from cellsam.distributed.source import fit_normalizer, open_source


def test_signal_windows_cover_the_signal_without_overlap() -> None:
    step, shape = 10, (3000, 2000)
    signal = np.zeros((300, 200), np.float32)
    signal[210:260, 130:180] = 1.0  # cells at y 2100:2600, x 1300:1800
    signal[20:40, 20:40] = 0.3  # a few dimmer cells at y 200:400, x 200:400
    windows = signal_windows(signal, step, shape, side=1024, count=3)
    y0, x0, y1, x1 = windows[0]
    assert y1 - y0 == x1 - x0 == 1024 and y0 <= 2100 and y1 >= 2600 and x0 <= 1300 and x1 >= 1800
    assert any(a <= 200 and c >= 400 and b <= 200 and d >= 400 for a, b, c, d in windows[1:])
    for i, (a0, b0, a1, b1) in enumerate(windows):
        assert 0 <= a0 < a1 <= 3000 and 0 <= b0 < b1 <= 2000
        for c0, d0, c1, d1 in windows[i + 1 :]:
            assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0, "windows overlap"
    assert signal_windows(np.zeros_like(signal), step, shape) == []
    assert signal_windows(signal[:50, :60], step, (500, 600)) == [(0, 0, 500, 600)]


def test_the_scale_half_of_the_cells_were_segmented_at() -> None:
    found = [(400, 40.0, 30), (100, 10.0, 50), (256, None, 90), (256, 27.0, 10)]
    assert weighted_median_scale(found, 256) == (100, 10.0)  # 50 of the 90 measured cells
    assert weighted_median_scale([(400, 40.0, 30), (100, 10.0, 20)], 256) == (400, 40.0)
    assert weighted_median_scale([(100, 10.0, 4)], 256) == (256, None)  # too few cells to measure
    assert weighted_median_scale([], 256) == (256, None)


@pytest.fixture(scope="module")
def default_model():  # type: ignore[no-untyped-def]
    from cellsam.weights import load_model

    return load_model("default").eval()


def test_windows_find_the_scale_of_the_whole_image(default_model) -> None:  # type: ignore[no-untyped-def]
    """The sample at 0.4x (nuclei ~18 px), twice, in a 1500 x 1100 dark image: two 360 px windows
    measure the scale that cellsam.segment finds on the small sample itself, far from the model's own."""
    import torch
    from skimage.transform import rescale

    import cellsam
    from cellsam.cli.segment import sample_path
    from cellsam.inference.params import SegmentParams
    from cellsam.io import load_image

    small = rescale(load_image(sample_path()).data.astype(np.float32), 0.4, order=1, preserve_range=True)
    big = np.zeros((1500, 1100), np.float32)
    big[1100:1244, 800:944] = small
    big[1300:1444, 100:244] = small[::-1]
    own = cellsam.segment(small, default_model)
    assert own.tile_size is not None and own.diameter is not None
    assert own.tile_size < default_model.cfg.tile_size / 1.3  # small nuclei: tiles smaller than the model's
    source = open_source(big)
    norm = fit_normalizer([source.read((0, 0, 1500, 1100))], 1)
    params = SegmentParams().for_model(default_model)
    tile, diameter = measure_scale(default_model, torch.device("cpu"), source, norm, params, side=360, count=2)
    assert diameter is not None and abs(diameter / own.diameter - 1.0) < 0.25, (diameter, own.diameter)
    assert max(tile, own.tile_size) <= 1.3 * min(tile, own.tile_size), (tile, own.tile_size)
    empty = open_source(np.zeros((1500, 1100), np.float32))
    assert measure_scale(default_model, torch.device("cpu"), empty, fit_normalizer([np.zeros((10, 10, 1))], 1),
                         params) == (default_model.cfg.tile_size, None)
