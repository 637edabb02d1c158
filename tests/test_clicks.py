"""Click sampling for the mask decoder: first clicks, corrective clicks, innermost pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellsam.train.clicks import correction_clicks, innermost_points, random_points


def disks(n: int = 3, side: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([(yy - 8 - 6 * i) ** 2 + (xx - 10 - 5 * i) ** 2 <= 16 for i in range(n)])


def test_random_points_fall_inside_their_masks_and_cover_them() -> None:
    m = disks()
    g = torch.Generator().manual_seed(0)
    seen = [set() for _ in range(len(m))]
    for _ in range(200):
        xy = random_points(m, g)
        assert xy.shape == (3, 2)
        for i, (x, y) in enumerate(xy.long().tolist()):
            assert m[i, y, x]
            seen[i].add((x, y))
    assert all(len(s) > 0.8 * int(m[i].sum()) for i, s in enumerate(seen))  # uniform, not one pixel
    with pytest.raises(ValueError, match="at least one pixel"):
        random_points(torch.zeros(1, 4, 4, dtype=torch.bool), g)


def test_correction_clicks_positive_on_misses_negative_on_false_pixels() -> None:
    target = disks(2)
    g = torch.Generator().manual_seed(1)
    missed = target.clone()
    missed[0, :, :10] = False  # part of cell 0 missed
    extra = target.clone()
    extra[1, 28:, 28:] = True  # false pixels for cell 1
    pred = torch.stack([missed[0], extra[1]])
    for _ in range(50):
        xy, lab = correction_clicks(pred, target, g)
        (x0, y0), (x1, y1) = xy.long().tolist()
        assert lab.tolist() == [1, 0]
        assert target[0, y0, x0] and not pred[0, y0, x0]
        assert pred[1, y1, x1] and not target[1, y1, x1]


def test_correction_click_for_a_perfect_prediction_is_positive_inside_the_cell() -> None:
    target = disks(1)
    xy, lab = correction_clicks(target.clone(), target, torch.Generator().manual_seed(2))
    x, y = xy.long()[0].tolist()
    assert lab.tolist() == [1] and target[0, y, x]


def test_innermost_points() -> None:
    lab = np.zeros((40, 60), np.int32)
    lab[5:16, 3:30] = 4  # 11 x 27 rectangle: innermost row 10, columns 8..24
    yy, xx = np.mgrid[:40, :60]
    r = np.hypot(yy - 28, xx - 45)
    lab[(r >= 4) & (r <= 9)] = 7  # a ring: its centre (45, 28) is not inside it
    pts = innermost_points(lab)
    assert set(pts) == {4, 7}
    x, y = pts[4]
    assert y == 10 and 8 <= x <= 24
    x, y = pts[7]
    assert lab[int(y), int(x)] == 7
    assert innermost_points(lab, ids=np.array([7])).keys() == {7}
    with pytest.raises(ValueError, match="label image"):
        innermost_points(np.zeros((2, 2, 2), np.int32))
