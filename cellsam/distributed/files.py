"""Many image files on Dask: each file is one task running :func:`cellsam.inference.files.segment_file` (what
``cellsam segment`` runs per file), so the outputs
(``<name>_labels.tif``, ``_overlay.png``, ``_cells.csv``, ``_coco.json``) are those of the single-process
``cellsam segment``. Images above ``LARGE_PIXELS`` or ``--max-pixels`` (read from the file's header,
never loaded) go through the block pipeline instead (:func:`cellsam.distributed.pipeline.segment_dask`), which writes
``<name>_labels.ome.zarr`` and ``<name>_cells.csv``.

A file that cannot be read or segmented (``ValueError``, ``TypeError``, ``OSError``) is reported and the
others go on, as in the CLI; any other error (a dead worker, out of memory) is retried by Dask and,
if it persists, reported with the file's path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellsam.inference.files import FileOptions, segment_file
from cellsam.inference.params import SegmentParams
from cellsam.io import BLOCKWISE_SUFFIXES as LAZY_SUFFIXES

log = logging.getLogger(__name__)

LARGE_PIXELS = 4096 * 4096
"""Files above this many pixels (from their headers) go through the block pipeline."""

Reason = Callable[[Path, BaseException], str]


def _file_task(path: Path, outdir: Path, name: str, model: Any, device: str | None, params: SegmentParams,
               options: FileOptions, reason: Reason) -> tuple[str, int | str]:
    """("ok", n_cells) or ("failed", reason) for one file, segmented on a worker."""
    from cellsam.distributed.cluster import worker_model

    net, _ = worker_model(model, device)
    try:
        return "ok", segment_file(path, outdir, name, net, params, options)
    except (ValueError, TypeError, OSError, MemoryError) as e:
        return "failed", reason(path, e)


def error_text(path: Path, error: BaseException) -> str:
    """Why ``path`` failed: the error's own message (the command line words it its own way)."""
    return str(error).removeprefix(f"{path}: ")


def image_pixels(path: Path, channel_axis: int | None = None) -> int:
    """H * W from the file's header (:func:`cellsam.io.probe_image`; a 3-D image without a channel axis: its
    two largest sides); 0 when it cannot be read window by window (PNG, JPEG) or its header is unreadable
    (then the file task reports why)."""
    from cellsam.io import ImageInfo, ImageReadError, probe_image

    if path.suffix.lower() not in LAZY_SUFFIXES:
        return 0
    try:
        info = probe_image(path)
    except ImageReadError:
        return 0
    if channel_axis is not None and len(info.shape) == 3:
        info = ImageInfo(info.path, info.shape, info.dtype, channel_axis)
    return info.pixels


def segment_files(
    paths: list[Path],
    names: list[str],
    outdir: Path,
    params: SegmentParams,
    options: FileOptions,
    model: Any,
    device: str | None,
    client: Any,
    *,
    reason: Reason = error_text,
    retries: int = 2,
) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    """Segment small files as one task each (``model``: a name / path loaded once per worker, or a model);
    returns (done (path, n_cells), failed (path, ``reason(path, error)``))."""
    futs = [
        client.submit(
            _file_task,
            p,
            outdir,
            n,
            model,
            device,
            params,
            options,
            reason,
            retries=retries,
            pure=False,
            key=f"cellsam-file-{i}-{n}",
        )
        for i, (p, n) in enumerate(zip(paths, names, strict=True))
    ]
    done: list[tuple[Path, int]] = []
    failed: list[tuple[Path, str]] = []
    from distributed import wait

    wait(futs)
    for p, f in zip(paths, futs, strict=True):
        if f.status != "finished":
            failed.append((p, f"{type(f.exception()).__name__}: {f.exception()}"))
            continue
        status, value = f.result()
        if status == "ok":
            done.append((p, int(value)))
        else:
            failed.append((p, str(value)))
    for p, why in failed:
        log.error("%s: %s", p, why)
    return done, failed


def segment_large_file(path: Path, name: str, outdir: Path, params: SegmentParams, options: FileOptions,
                       model: Any, device: str | None, client: Any) -> int:
    """One large file through the block pipeline (``<name>_labels.ome.zarr``, ``<name>_cells.csv``); returns
    the number of cells. ``params.diameter``: pixels, "auto" or None (see :func:`.pipeline.segment_dask`)."""
    from cellsam import io
    from cellsam.distributed.pipeline import segment_dask

    res = segment_dask(
        path,
        model,
        output=outdir / f"{name}_labels.ome.zarr",
        client=client,
        channel_axis=options.channel_axis,
        channels=options.channels,
        device=device,
        params=params,
    )
    rows = [{k: r[k] for k in io.CSV_COLUMNS} for r in res.rows]
    if res.diameter is not None:
        log.info("%s: cells of %.1f px, segmented in tiles of %d px", path, res.diameter, res.tile_size)
    io.write_cells_csv(outdir / f"{name}_cells.csv", rows)
    return res.n_cells
