"""Window reads from a TIFF without decoding the whole image.

tifffile's own Zarr store (``imread(aszarr=True)``) needs zarr >= 3 in current tifffile releases, while
cellsam pins zarr < 3; so this module reads only the strips / tiles that a window touches, with tifffile's
per-segment decoder (``TiffPage.decode``), for the first series of a file: pages of (Y, X), contiguous
(Y, X, S) or separate (S, Y, X) samples, stacked along any leading page axes (e.g. C of a CYX OME-TIFF).
Uncompressed files that tifffile can memory-map are memory-mapped instead.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

MAX_SEGMENT_BYTES = 256 * 2**20
"""A compressed strip / tile larger than this is refused: every window that touches it decodes it whole."""


class TiffArray:
    """A read-only array view (``shape``, ``dtype``, ``ndim``, ``__getitem__`` with ints / slices) of the
    first series of a TIFF file; ``axes`` are tifffile's series axes."""

    def __init__(self, path: str) -> None:
        import tifffile

        self._tf = tifffile.TiffFile(path)
        series = self._tf.series[0]
        self.axes, self.shape, self.dtype = series.axes, tuple(series.shape), np.dtype(series.dtype)
        self.ndim = len(self.shape)
        self._key = series.keyframe
        self._pages = list(series.pages)
        page_nd = len(self._key.shape)
        self._lead = self.shape[: self.ndim - page_nd]
        n_sep, _, _, _, n_con = self._key.shaped
        self._kind = "YX" if page_nd == 2 else "SYX" if n_sep > 1 else "YXS" if n_con > 1 else "?"
        if int(np.prod(self._lead, dtype=np.int64)) != len(self._pages) or self._kind == "?":
            raise ValueError(
                f"{path}: TIFF layout {self.axes} {self.shape} cannot be read by windows; "
                "convert it to OME-Zarr"
            )
        self._mm = None
        if not self._key.is_memmappable:
            self._check_segments(path)
        if self._key.is_memmappable:
            try:
                self._mm = tifffile.memmap(path, mode="r")
                if self._mm.shape != self.shape:
                    self._mm = None
            except (ValueError, OSError):
                self._mm = None

    def _check_segments(self, path: str) -> None:
        """Refuse files whose strips / tiles are too large to decode once per window (one strip per image)."""
        page = self._key
        _, _, length, width, n_con = page.shaped
        rows, cols = (page.tilelength, page.tilewidth) if page.is_tiled else (
            min(page.rowsperstrip or length, length), width)
        size = int(rows) * int(cols) * int(n_con) * self.dtype.itemsize
        if size > MAX_SEGMENT_BYTES:
            kind = "tiles" if page.is_tiled else "strips"
            raise ValueError(
                f"{path}: compressed in {kind} of {rows}x{cols} pixels ({size / 2**20:,.0f} MiB each), which "
                "every window would decode whole: rewrite it tiled (tifffile.imwrite(..., tile=(1024, 1024), "
                "compression='zlib')) or as OME-Zarr"
            )

    def __getitem__(self, idx: Any) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = idx + (slice(None),) * (self.ndim - len(idx))
        if self._mm is not None:
            return np.asarray(self._mm[idx])
        lead, page_idx = idx[: len(self._lead)], idx[len(self._lead) :]
        ranges = [
            range(*i.indices(n)) if isinstance(i, slice) else [int(i) % n] for i, n in zip(lead, self._lead)
        ]
        parts = [
            self._page(int(np.ravel_multi_index(c, self._lead)) if c else 0, page_idx)
            for c in itertools.product(*ranges)
        ]
        out = np.stack(parts) if parts else np.zeros((0,), self.dtype)
        kept = [len(r) for r, i in zip(ranges, lead) if isinstance(i, slice)]
        return out.reshape(*kept, *parts[0].shape) if parts else out

    def _page(self, k: int, page_idx: tuple[Any, ...]) -> np.ndarray:
        """One page's window: ``page_idx`` indexes the page axes (slices for Y and X)."""
        ia = dict(zip(self._kind, page_idx))  # by role: Y, X, S (samples, whatever tifffile calls them)
        if not isinstance(ia["Y"], slice) or not isinstance(ia["X"], slice):
            raise TypeError("TiffArray needs slices for the Y and X axes")
        _, _, length, width, _ = self._key.shaped
        y0, y1, sy = ia["Y"].indices(length)
        x0, x1, sx = ia["X"].indices(width)
        if sy < 1 or sx < 1:
            raise ValueError("negative steps are not supported")
        win = self._window(self._pages[k], y0, max(y1, y0), x0, max(x1, x0))[:, ::sy, ::sx, :]
        out = {"YX": win[0, :, :, 0], "YXS": win[0], "SYX": win[..., 0]}[self._kind]
        return out[tuple(slice(None) if a in "YX" else ia[a] for a in self._kind)]

    def _window(self, frame: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(S_separate, y1 - y0, x1 - x0, S_contiguous) pixels of one page, from the segments it touches."""
        page = self._key  # layout and decoder; ``frame`` has the segment offsets
        n_sep, _, length, width, n_con = page.shaped
        out = np.zeros((n_sep, y1 - y0, x1 - x0, n_con), self.dtype)
        if y1 <= y0 or x1 <= x0:
            return out
        if page.is_tiled:
            tl, tw = page.tilelength, page.tilewidth
            n_ty, n_tx = math.ceil(length / tl), math.ceil(width / tw)
            cells = [
                (s * n_ty + ty) * n_tx + tx
                for s in range(n_sep)
                for ty in range(y0 // tl, (y1 - 1) // tl + 1)
                for tx in range(x0 // tw, (x1 - 1) // tw + 1)
            ]
        else:
            rps = min(page.rowsperstrip or length, length)
            n_sy = math.ceil(length / rps)
            cells = [s * n_sy + sy for s in range(n_sep) for sy in range(y0 // rps, (y1 - 1) // rps + 1)]
        decode = page.decode
        fh = self._tf.filehandle
        for i in cells:
            offset, count = frame.dataoffsets[i], frame.databytecounts[i]
            data = None
            if count:
                with fh.lock:
                    fh.seek(offset)
                    data = fh.read(count)
            seg, (s, _, sy0, sx0, _), shape = decode(data, i, jpegtables=page.jpegtables)
            if seg is None:
                continue  # an empty segment: zeros
            seg = np.asarray(seg).reshape(-1, *shape)[0, 0]  # (h, w, S_contig) of depth 0
            ay0, ax0 = max(sy0, y0), max(sx0, x0)
            ay1, ax1 = min(sy0 + seg.shape[0], y1), min(sx0 + seg.shape[1], x1)
            if ay0 < ay1 and ax0 < ax1:
                out[s, ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = seg[
                    ay0 - sy0 : ay1 - sy0, ax0 - sx0 : ax1 - sx0
                ]
        return out
