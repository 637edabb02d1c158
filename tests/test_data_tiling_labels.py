"""Tiling, label filters and overlap removal."""

from __future__ import annotations

import numpy as np
import pytest

from cellsam.data.labels import filter_labels, masks_to_labels
from cellsam.data.tiling import crop, crop_origins, tile_starts


@pytest.mark.parametrize(
    ("size", "expected"),
    [(1, [0]), (300, [0]), (512, [0]), (513, [0, 384]), (896, [0, 384]), (897, [0, 384, 768]),
     (1000, [0, 384, 768]), (1388, [0, 384, 768, 1152])],
)
def test_tile_starts_cover_with_25pc_overlap(size: int, expected: list[int]) -> None:
    starts = tile_starts(size)
    assert starts == expected
    assert starts[-1] + 512 >= size  # covers the whole axis
    assert all(b - a == 384 for a, b in zip(starts, starts[1:], strict=False))  # 128 px = 25 % overlap


def test_crop_origins_cover_every_pixel_of_odd_image() -> None:
    h, w = 777, 1031
    cover = np.zeros((h, w), int)
    grid = crop_origins((h, w))
    assert len(grid) == 2 * 3  # 777 -> starts 0, 384; 1031 -> 0, 384, 768
    for y, x in grid:
        cover[y : y + 512, x : x + 512] += 1
    assert cover.min() >= 1


def test_crop_zero_pads() -> None:
    a = np.arange(1, 301).reshape(1, 15, 20)
    t = crop(a, 0, 0, tile=32)
    assert t.shape == (1, 32, 32) and np.array_equal(t[0, :15, :20], a[0]) and (t[0, 15:] == 0).all()
    t2 = crop(a, 8, 16, tile=32)
    assert np.array_equal(t2[0, :7, :4], a[0, 8:, 16:]) and t2[0, 7:].sum() == 0


def test_filter_labels_drops_and_renumbers() -> None:
    lab = np.zeros((20, 20), np.int32)
    lab[1:5, 1:5] = 7  # good
    lab[8, 1:10] = 3  # 1 pixel high -> thin
    lab[10:14, 15] = 4  # 1 pixel wide -> thin
    lab[15:17, 1:3] = 9  # two parts -> disjoint
    lab[15:17, 6:8] = 9
    lab[1:4, 10:14] = 12  # good
    out, drops = filter_labels(lab)
    assert drops == {"disjoint": 1, "thin": 2}
    assert out.dtype == np.int32 and sorted(np.unique(out)) == [0, 1, 2]
    assert (out[1:5, 1:5] == 1).all() and (out[1:4, 10:14] == 2).all()  # order of original ids kept
    diag = np.zeros((6, 6), np.int32)
    diag[1:3, 1:3] = 1
    diag[3:5, 3:5] = 1  # touching diagonally: one object under 8-connectivity
    assert filter_labels(diag)[1] == {"disjoint": 0, "thin": 0}


def test_masks_to_labels_cellpose_overlap_rule() -> None:
    big = np.zeros((30, 30), bool)
    big[5:25, 5:25] = True
    small_inside = np.zeros_like(big)
    small_inside[10:14, 10:14] = True  # 100 % covered by big -> dropped
    right = np.zeros_like(big)
    right[5:25, 20:29] = True  # overlaps big in columns 20..24
    labels, dropped = masks_to_labels([big, small_inside, right])
    assert dropped == 1
    assert sorted(np.unique(labels)) == [0, 1, 2]
    cb, cr = (14.5, 14.5), (14.5, 24.0)  # centroids of big and right
    for x in range(20, 25):  # overlap pixels go to the nearest centroid
        expect = 1 if abs(x - cb[1]) < abs(x - cr[1]) else 2
        assert labels[15, x] == expect
    assert (labels[10:14, 10:14] == 1).all()


def test_masks_to_labels_keeps_partial_overlap() -> None:
    a = np.zeros((10, 10), bool)
    a[0:4, 0:4] = True
    b = np.zeros_like(a)
    b[2:6, 0:4] = True  # 50 % covered: kept
    labels, dropped = masks_to_labels(np.stack([a, b]))
    assert dropped == 0 and labels.max() == 2
