"""Windowed upscaling of mask logits equals full-frame bilinear resizing (the pipeline's old path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cellsam.inference.upscale import resize_matrix, upscale_cells


def _full(lo: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    up = lo[:, None]
    for s in sizes:
        up = F.interpolate(up, size=(s, s), mode="bilinear", align_corners=False)
    return up[:, 0]


def _blobs(n: int, r: int, seed: int) -> torch.Tensor:
    """(n, r, r) logits: one Gaussian bump per cell (peak 6, floor -8), some bumps at the frame edge."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(r, dtype=torch.float32), torch.arange(r, dtype=torch.float32),
                            indexing="ij")
    c = torch.rand(n, 2, generator=g) * r
    c[0] = torch.tensor([0.0, r - 1.0])  # a cell in a corner
    s = 1.0 + torch.rand(n, generator=g) * r / 8
    d2 = (yy[None] - c[:, 0, None, None]) ** 2 + (xx[None] - c[:, 1, None, None]) ** 2
    return -8.0 + 14.0 * torch.exp(-d2 / (2 * s[:, None, None] ** 2))


@pytest.mark.parametrize("sizes", [(64,), (64, 96), (256, 128), (32, 48)])
def test_resize_matrix_equals_interpolate(sizes: tuple[int, ...]) -> None:
    x = torch.randn(3, 16, 16)
    m = torch.from_numpy(resize_matrix(16, sizes))
    np.testing.assert_allclose(m @ x @ m.T, _full(x, sizes), atol=1e-5)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)  # convex combinations


@pytest.mark.parametrize(("r", "sizes", "valid"), [(32, (128,), (128, 128)), (32, (128, 192), (192, 150)),
                                                    (64, (256, 128), (100, 128))])
def test_windows_hold_every_foreground_pixel_with_the_full_frame_values(r: int, sizes: tuple, valid: tuple) -> None:
    lo = _blobs(12, r, seed=r)
    full = _full(lo, sizes)[:, : valid[0], : valid[1]]
    for thr in (0.0, 1.5):
        wins = upscale_cells(lo, sizes, thr, valid)
        for k, win in enumerate(wins):
            fg = (full[k] > thr).numpy()
            if win is None:
                assert not fg.any()
                continue
            y0, x0, w = win
            assert y0 >= 0 and x0 >= 0 and y0 + w.shape[0] <= valid[0] and x0 + w.shape[1] <= valid[1]
            np.testing.assert_allclose(w, full[k, y0 : y0 + w.shape[0], x0 : x0 + w.shape[1]], atol=1e-4)
            inside = np.zeros_like(fg)
            inside[y0 : y0 + w.shape[0], x0 : x0 + w.shape[1]] = True
            assert not (fg & ~inside).any(), "a foreground pixel lies outside the window"
            assert w.size < fg.size  # a window, not the frame


def test_no_foreground_gives_none_and_bf16_input_is_accepted() -> None:
    lo = torch.full((2, 16, 16), -5.0)
    lo[1, 4:6, 4:6] = 3.0
    wins = upscale_cells(lo.to(torch.bfloat16), (64,), 0.0, (64, 64))
    assert wins[0] is None and wins[1] is not None
    y0, x0, w = wins[1]
    assert 8 <= y0 <= 16 and 8 <= x0 <= 16 and w.dtype == np.float32
