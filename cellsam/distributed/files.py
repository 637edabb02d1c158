"""Many image files on Dask: each file is one task running the CLI's own ``segment_file``, so the outputs
(``<name>_labels.tif``, ``_overlay.png``, ``_cells.csv``, ``_coco.json``) are those of the single-process
``cellsam segment``. Images above ``LARGE_PIXELS`` or ``--max-pixels`` (read from the file's header,
never loaded) go through the block pipeline instead (:func:`cellsam.distributed.pipeline.segment_dask`), which writes
``<name>_labels.ome.zarr`` and ``<name>_cells.csv``.

A file that cannot be read or segmented (``ValueError``, ``TypeError``, ``OSError``) is reported and the
others go on, as in the CLI; any other error (a dead worker, out of memory) is retried by Dask and,
if it persists, reported with the file's path.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from cellsam.io import BLOCKWISE_SUFFIXES as LAZY_SUFFIXES

log = logging.getLogger(__name__)

LARGE_PIXELS = 4096 * 4096


def _file_task(
    path: Path, outdir: Path, name: str, model: Any, device: str, args: argparse.Namespace
) -> tuple[str, int | str]:
    """("ok", n_cells) or ("failed", reason) for one file, segmented on a worker."""
    from cellsam.cli.segment import failure_reason, segment_file
    from cellsam.distributed.cluster import worker_model

    net, _ = worker_model(model, device)
    try:
        return "ok", segment_file(path, outdir, name, net, args)
    except (ValueError, TypeError, OSError, MemoryError) as e:
        return "failed", failure_reason(path, e)


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
    args: argparse.Namespace,
    client: Any,
    *,
    retries: int = 2,
) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    """Segment small files as one task each; returns (done (path, n_cells), failed (path, reason))."""
    futs = [
        client.submit(
            _file_task,
            p,
            outdir,
            n,
            args.model,
            args.device,
            args,
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


def block_diameter(args: argparse.Namespace) -> float | None:
    """The diameter for the block path: a number, or None (auto needs the whole image, see segment_dask)."""
    from cellsam.cli.segment import diameter_of

    d = diameter_of(args)
    if d == "auto":
        if getattr(args, "diameter", None) == "auto":  # asked for explicitly
            raise ValueError("--diameter auto needs the whole image: with --dask give the diameter in pixels")
        return None
    return None if d is None else float(d)


def segment_large_file(path: Path, name: str, outdir: Path, args: argparse.Namespace, client: Any) -> int:
    """One large file through the block pipeline; returns the number of cells."""
    from cellsam import io
    from cellsam.distributed.pipeline import segment_dask
    from cellsam.inference.segment import DEFAULT_MIN_AREA

    res = segment_dask(
        path,
        args.model,
        output=outdir / f"{name}_labels.ome.zarr",
        client=client,
        channel_axis=args.channel_axis,
        channels=tuple(args.channels) if args.channels is not None else None,
        box_threshold=args.box_threshold,
        iou_threshold=args.iou_threshold,
        mask_threshold=args.mask_threshold,
        min_area=DEFAULT_MIN_AREA if args.min_area is None else args.min_area,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        diameter=block_diameter(args),
        batch_size=args.batch_size,
        decode_copies=args.decode_copies,
        decode_window=args.decode_window,
        device=args.device,
    )
    rows = [{k: r[k] for k in io.CSV_COLUMNS} for r in res.rows]
    io.write_cells_csv(outdir / f"{name}_cells.csv", rows)
    return res.n_cells


def run_cli(args: argparse.Namespace, paths: list[Path], n_missing: int, outdir: Path) -> int:
    """``cellsam segment --dask [ADDRESS]``: returns 0 when every image was segmented, else 1."""
    from cellsam.cli.segment import _unique_name, failure_reason, max_pixels
    from cellsam.distributed.cluster import BlockFailure, close_client, get_client

    t0 = time.perf_counter()
    address = None if args.dask in (None, "", "local") else args.dask
    try:
        client, owned = get_client(address)
    except (OSError, ValueError, TypeError) as e:
        log.error("cannot connect to the Dask scheduler %r: %s", args.dask, e)
        return 1
    used: set[str] = set()
    names = [_unique_name(p, used) for p in paths]
    limit = min(LARGE_PIXELS, max_pixels(args))
    large = [image_pixels(p, args.channel_axis) > limit for p in paths]
    done: list[tuple[Path, int]] = []
    failed: list[tuple[Path, str]] = []
    try:
        small = [i for i, big in enumerate(large) if not big]
        if small:
            d, f = segment_files([paths[i] for i in small], [names[i] for i in small], outdir, args, client)
            done, failed = done + d, failed + f
        for i in (i for i, big in enumerate(large) if big):
            try:
                done.append((paths[i], segment_large_file(paths[i], names[i], outdir, args, client)))
            except (BlockFailure, ValueError, TypeError, OSError, MemoryError) as e:
                failed.append((paths[i], failure_reason(paths[i], e)))
                log.error("%s: %s", paths[i], failed[-1][1])
    finally:
        if owned:
            close_client(client)
    total = sum(n for _, n in done)
    print(
        f"cellsam segment (dask): {len(done)} image(s) segmented, {total} cell(s), {len(failed) + n_missing} "
        f"failed, {time.perf_counter() - t0:.1f} s; outputs in {outdir}"
    )
    for path, reason in failed:
        print(f"  FAILED {path}: {reason}")
    return 1 if failed or n_missing else 0
