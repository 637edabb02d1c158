"""Shared fixtures: tiny model config, synthetic images, access to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CELLSAM_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ``../shared/data``; tests using it skip cleanly where it is absent."""
    if not (SHARED_DATA / "manifest.csv").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def make_blobs(shape: tuple[int, int] = (128, 128), n: int = 12, radius: tuple[int, int] = (5, 10),
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic bright disks on a dark background.

    Returns:
        image: (H, W) float32 in [0, 1]; labels: (H, W) int32, 0 = background, 1..n cells
        (disks do not overlap).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:h, :w]
    k = 0
    for _ in range(n * 50):
        if k == n:
            break
        r = int(rng.integers(radius[0], radius[1] + 1))
        cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 2) ** 2
        if labels[grown].any():
            continue
        k += 1
        labels[disk] = k
    image = (labels > 0).astype(np.float32) * 0.8 + rng.normal(0, 0.05, shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32), labels
