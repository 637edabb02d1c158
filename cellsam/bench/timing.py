"""Timing primitives: repeat statistics, an exclusive per-stage timer and peak-memory probes.

- :func:`summarize`: median, quartiles, IQR, min, max of repeated measurements.
- :class:`StageTimer`: accumulates wall time per named stage; nested stages are *exclusive* (the time
  of an inner stage is not counted again in the outer one), so stage times add up to at most the
  wall time around them. On CUDA it synchronises at stage boundaries.
- :class:`PeakMemory`: peak resident memory of this process between :meth:`~PeakMemory.reset` and
  :meth:`~PeakMemory.peak`. On Linux the peak is reset through ``/proc/self/clear_refs`` and read from
  ``VmHWM``; elsewhere it falls back to ``resource.getrusage`` (the peak over the process's life, marked
  ``"lifetime"``). On a GPU it also reports ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


def summarize(values: list[float] | np.ndarray) -> dict[str, Any]:
    """Statistics of repeated measurements (seconds or any unit).

    Returns:
        ``{"median", "q1", "q3", "iqr", "min", "max", "mean", "n", "values"}``; an empty input gives
        NaNs and ``n = 0``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        nan = float("nan")
        return {"median": nan, "q1": nan, "q3": nan, "iqr": nan, "min": nan, "max": nan, "mean": nan,
                "n": 0, "values": []}
    q1, med, q3 = (float(x) for x in np.percentile(v, [25, 50, 75]))
    return {
        "median": med,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "n": int(v.size),
        "values": [float(x) for x in v],
    }


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued kernels on ``device`` (no-op on the CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)
    elif dev.type == "mps" and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.synchronize()


class StageTimer:
    """Wall time per named stage, exclusive of nested stages, plus call counts.

    Example::

        timer = StageTimer(device)
        with timer.stage("encoder"):
            ...
        timer.seconds   # {"encoder": 1.23}
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list[Any]] = []  # [name, start]

    def reset(self) -> None:
        """Forget all accumulated times (must not be inside a stage)."""
        if self._stack:
            raise RuntimeError("StageTimer.reset() called inside a stage")
        self.seconds, self.calls = {}, {}

    def _add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the enclosed block under ``name`` (accumulates over calls)."""
        synchronize(self.device)
        now = time.perf_counter()
        if self._stack:  # pause the enclosing stage
            outer = self._stack[-1]
            self._add(outer[0], now - outer[1])
        self._stack.append([name, now])
        self.calls[name] = self.calls.get(name, 0) + 1
        try:
            yield
        finally:
            synchronize(self.device)
            end = time.perf_counter()
            inner = self._stack.pop()
            self._add(inner[0], end - inner[1])
            if self._stack:  # resume the enclosing stage
                self._stack[-1][1] = end

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed under ``name`` at every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        timed.__name__ = getattr(fn, "__name__", name)
        return timed


# ---------------------------------------------------------------------------------------------- memory
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux), else None."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _rusage_peak_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Peak RSS (and CUDA allocated memory) between :meth:`reset` and :meth:`peak`."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.method = "vmhwm" if self._can_reset() else "lifetime"
        self.rss_before: int | None = None

    @staticmethod
    def _can_reset() -> bool:
        return _status_kib("VmHWM") is not None and os.access(_CLEAR_REFS, os.W_OK)

    def reset(self) -> None:
        """Start a new peak window (the RSS peak resets to the current RSS where the OS allows it)."""
        self.rss_before = current_rss_bytes()
        if self.method == "vmhwm":
            try:
                with open(_CLEAR_REFS, "w") as f:
                    f.write("5")
            except OSError:
                self.method = "lifetime"
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> dict[str, Any]:
        """``{"rss_bytes", "rss_before_bytes", "rss_method", "gpu_allocated_bytes" (None off CUDA)}``."""
        rss: int | None = None
        if self.method == "vmhwm":
            kib = _status_kib("VmHWM")
            rss = None if kib is None else kib * 1024
        if rss is None:
            rss = _rusage_peak_bytes()
        gpu = None
        if self.device.type == "cuda" and torch.cuda.is_available():
            gpu = int(torch.cuda.max_memory_allocated(self.device))
        return {"rss_bytes": int(rss), "rss_before_bytes": self.rss_before, "rss_method": self.method,
                "gpu_allocated_bytes": gpu}


def merge_peaks(peaks: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine :meth:`PeakMemory.peak` records of several repeats: the highest peaks, the lowest start."""
    if not peaks:
        return {"peak_rss_bytes": None, "rss_before_bytes": None, "rss_method": None,
                "peak_gpu_allocated_bytes": None}
    before = [m["rss_before_bytes"] for m in peaks if m.get("rss_before_bytes") is not None]
    gpu = [m["gpu_allocated_bytes"] for m in peaks if m.get("gpu_allocated_bytes") is not None]
    return {
        "peak_rss_bytes": max(m["rss_bytes"] for m in peaks),
        "rss_before_bytes": min(before) if before else None,
        "rss_method": peaks[0]["rss_method"],
        "peak_gpu_allocated_bytes": max(gpu) if gpu else None,
    }
