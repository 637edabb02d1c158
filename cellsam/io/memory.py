"""How much memory in-memory segmentation takes, and how many pixels this machine allows
(:func:`default_max_pixels`; larger images go block by block through :mod:`cellsam.distributed`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cellsam.io.read import ImageInfo

IN_MEMORY_BYTES_PER_PIXEL = 48
"""Peak memory of in-memory segmentation (``cellsam segment`` without ``--dask``) per image pixel, model and
runtime excluded: 43 bytes measured on uint16 grey images (peak RSS 1.31 GB at 4096 x 4096, 2.19 GB at
6144 x 6144; 40 bytes from 2048 x 2048 to 3072 x 3072 with 1,600 / 3,600 cells), rounded up for
colour and float inputs."""

MEMORY_MARGIN = 0.8
"""Share of the available memory :func:`default_max_pixels` lets one image use."""


def estimated_bytes(info: ImageInfo) -> int:
    """Memory that in-memory segmentation of this image takes at its peak (model excluded)."""
    return info.pixels * IN_MEMORY_BYTES_PER_PIXEL


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int | None:
    """Memory this process can still take: Linux ``MemAvailable``, capped by a cgroup v2 limit (containers);
    psutil elsewhere when installed; None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        try:
            import psutil

            avail = int(psutil.virtual_memory().available)
        except ImportError:
            return None
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        avail = max(limit - used, 0) if avail is None else min(avail, max(limit - used, 0))
    return avail


FALLBACK_MAX_PIXELS = 100_000_000
""":func:`default_max_pixels` where the available memory is unknown."""


def default_max_pixels(available: int | None = None) -> int:
    """The most pixels in-memory segmentation should take on this machine: ``MEMORY_MARGIN`` of the
    available memory (:func:`available_memory_bytes` when ``available`` is None) at
    ``IN_MEMORY_BYTES_PER_PIXEL``; ``FALLBACK_MAX_PIXELS`` when that is unknown."""
    avail = available_memory_bytes() if available is None else available
    if avail is None:
        return FALLBACK_MAX_PIXELS
    return max(int(avail * MEMORY_MARGIN) // IN_MEMORY_BYTES_PER_PIXEL, 1)
