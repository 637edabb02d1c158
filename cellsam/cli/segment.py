"""``cellsam segment INPUT... -o OUTDIR``: segment image files and write labels, overlays, tables.

Per image ``<name>``: ``<name>_labels.tif`` (uint16, uint32 above 65535 cells), ``<name>_overlay.png``
(outlines over the image), ``<name>_cells.csv`` and, with ``--coco``, ``<name>_coco.json``.
A file that fails is reported and the others are still processed; the exit code is 1 if any failed.
An image above ``--max-pixels`` (default: what this machine's available memory allows, read from the
file's header before decoding) is refused with a one-line reason; ``--dask`` segments such images
block by block.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any

from cellsam.cli import add_flip_test_options
from cellsam.config import DEFAULT_DECODE_WINDOW, DEFAULT_DIAMETER, POLARITIES, parse_diameter
from cellsam.inference.files import FileOptions, segment_file, unique_name
from cellsam.inference.params import DEFAULT_MIN_AREA, DEFAULT_MIN_AREA_REL, SegmentParams

log = logging.getLogger(__name__)


def sample_path() -> Path:
    """The sample image shipped with the package (``cellsam/samples/nuclei.png``)."""
    return Path(str(resources.files("cellsam") / "samples" / "nuclei.png"))


def _channel(value: str) -> int | None:
    if value.lower() in ("none", "-", "x"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"channel index must be an integer or 'none', got {value!r}"
        ) from None


def _pixels(value: str) -> int:
    """``--max-pixels``: a pixel count (``250000000``, ``2.5e8``) or a size (``16000x16000``)."""
    try:
        if "x" in value.lower():
            h, w = (int(v) for v in value.lower().split("x"))
            n = h * w
        else:
            n = int(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--max-pixels takes a pixel count (2.5e8) or a size (16000x16000), got {value!r}"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--max-pixels must be >= 1, got {value!r}")
    return n


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``segment`` on the ``cellsam`` command."""
    p = subparsers.add_parser(
        "segment",
        help="segment cells in images",
        description="Segment every cell in TIFF / PNG / JPEG / NPY / OME-Zarr images.",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument(
        "-o",
        "--output",
        "--out",
        dest="output",
        type=Path,
        default=None,
        help="output folder (default: ./cellsam_output)",
    )
    p.add_argument("--sample", action="store_true", help="also segment the sample image bundled with cellsam")
    p.add_argument(
        "--model", default="default", help="weights name or checkpoint path (default: the shipped model)"
    )
    p.add_argument(
        "--channel-axis",
        type=int,
        default=None,
        help="channel axis of 3-D images (0 for CHW, -1 for HWC); read from the file when it says",
    )
    p.add_argument(
        "--channels",
        nargs=2,
        type=_channel,
        metavar=("NUCLEAR", "WHOLECELL"),
        default=None,
        help="channel indices of the nuclear and whole-cell stains ('none' for a missing one)",
    )
    p.add_argument("--box-threshold", type=float, default=None,
                   help="minimum detector score (default: the model's own, 0.4 in the paper)")
    p.add_argument("--box-threshold-rel", type=float, default=None,
                   help="relative detector score: drop cells scoring under this x the 90th percentile of the "
                        "image's cells (default: the model's own; 0: off)")
    p.add_argument(
        "--iou-threshold", type=float, default=None, help="minimum predicted mask IoU (default: the model's own)"
    )
    p.add_argument(
        "--mask-threshold", type=float, default=None, help="mask probability threshold (default: the model's own)"
    )
    p.add_argument(
        "--min-area", type=int, default=None, help="drop cells smaller than this many pixels (default 15)"
    )
    p.add_argument("--min-area-rel", type=float, default=DEFAULT_MIN_AREA_REL, metavar="F",
                   help="drop cells smaller than F x the median area of the image's cells: specks and fragments "
                   f"(default {DEFAULT_MIN_AREA_REL:g}; 0: off)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile side in image pixels (default: the model's own tile size, 256 for the default)")
    p.add_argument("--diameter", type=diameter_arg, default=None, metavar="auto|none|N",
                   help="typical cell diameter in pixels: the image is segmented at the scale where its cells have "
                   "the size the model was trained on; auto: estimated by the model's size model; none: the "
                   f"image's own scale (default: {DEFAULT_DIAMETER or 'none'}; not with --tile-size)")
    p.add_argument("--polarity", choices=POLARITIES, default="auto",
                   help="auto (default): an image whose whole-cell channel has a light background (phase "
                   "contrast, bright field) is segmented with that channel inverted when the model is more "
                   "confident so (e.g. dark bacteria in phase contrast); as_is / inverted: fix the choice")
    p.add_argument("--tile-overlap", type=float, default=0.25, help="tile overlap fraction (default 0.25)")
    p.add_argument("--batch-size", type=int, default=4, help="tiles per forward pass (default 4)")
    p.add_argument("--decode-copies", action="store_true",
                   help="decode a cell in every overlapping tile that detects it, not only in the tile "
                   "that holds it farthest from its borders (about 2x slower masks; a few more cells)")
    p.add_argument("--decode-window", type=float, default=DEFAULT_DECODE_WINDOW, metavar="X",
                   help="compute each mask on decoder tokens within X times its box's longer side (default "
                   f"{DEFAULT_DECODE_WINDOW:g}; same values there as whole frames, less work); 0: whole frames")
    add_flip_test_options(p, "default: the model's own")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 runs the networks under bfloat16 autocast (faster on CPUs with bf16 units)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="default: auto")
    p.add_argument("--coco", action="store_true", help="also write <name>_coco.json (RLE masks and scores)")
    p.add_argument(
        "--dask", nargs="?", const="local", default=None, metavar="ADDRESS",
        help="run on Dask: a LocalCluster, or the scheduler at ADDRESS (tcp://host:8786); files go to "
        "workers, images above 4096x4096 px are cut into blocks and written to <name>_labels.ome.zarr",
    )
    p.add_argument(
        "--max-pixels", type=_pixels, default=None, metavar="N|HxW",
        help="largest image segmented in memory, read from the file's header before decoding (default: what "
        "80%% of the available memory allows at 48 bytes per pixel: 1 GiB per 22 megapixels); larger ones are "
        "refused, or with --dask segmented block by block",
    )
    p.set_defaults(func=run)
    return p


def cli_wording(message: str) -> str:
    """A library error message in the command line's terms: ``channel_axis=0`` -> ``--channel-axis 0``,
    ``channels=(a, b)`` -> ``--channels a b`` (``None`` -> ``none``), a bare ``channels=`` -> ``--channels``,
    ``device='cpu' or 'auto'`` -> ``--device cpu or auto``."""
    message = re.sub(r"\bchannel_axis=(-?\d+)", r"--channel-axis \1", message)
    message = re.sub(r"\bchannels=\(([^,()]*), ([^()]*)\)",
                     lambda m: "--channels " + " ".join(v.strip().replace("None", "none") for v in m.groups()), message)
    message = message.replace("(None for a missing one)", "(none for a missing one)")
    message = re.sub(r"\bdevice='(\w+)' or '(\w+)'", r"--device \1 or \2", message)
    return re.sub(r"\bchannels=", "--channels ", message)


def too_large_reason(e: Any) -> str:
    """The command line's one-line reason for an :class:`~cellsam.io.ImageTooLarge` image."""
    info = e.info
    h, w = info.side
    if info.blockwise:
        how = f"segment it block by block with --dask (writes {_stem(info.path)}_labels.ome.zarr)"
    else:
        how = (f"{info.path.suffix.lower()} files are decoded whole: convert it to a tiled TIFF or OME-Zarr "
               "and use --dask")
    return (f"{h}x{w} image ({info.pixels / 1e6:,.0f} megapixels) is above --max-pixels "
            f"{e.max_pixels / 1e6:,.0f} megapixels (in memory it would need about "
            f"{_estimated_gib(info):,.0f} GiB): {how}, or raise --max-pixels if this machine has the memory")


def _stem(path: Path) -> str:
    from cellsam.io import image_name

    return image_name(path)


def _estimated_gib(info: Any) -> float:
    from cellsam.io import estimated_bytes

    return estimated_bytes(info) / 2**30


def failure_reason(path: Path, error: BaseException) -> str:
    """One line saying why ``path`` failed, in the command line's terms (without the path)."""
    from cellsam.io import ImageTooLarge

    if isinstance(error, ImageTooLarge):
        return too_large_reason(error)
    if isinstance(error, MemoryError):
        return (f"out of memory ({error or 'MemoryError'}): segment it block by block with --dask, or lower "
                "--max-pixels so that images this large are refused before they are read")
    return cli_wording(str(error)).removeprefix(f"{path}: ")


def max_pixels(args: argparse.Namespace) -> int:
    """``--max-pixels``, or what this machine's available memory allows."""
    from cellsam.io import default_max_pixels

    given = getattr(args, "max_pixels", None)
    return default_max_pixels() if given is None else int(given)


def load_model(name: str, device: str) -> Any:
    """The model for ``--model`` on ``--device`` (separate so tests can substitute a model)."""
    from cellsam.inference.runtime import resolve_device
    from cellsam.weights import load_model as _load

    return _load(name, device=resolve_device(device))


def diameter_arg(text: str) -> float | str:
    """argparse type of --diameter: a number of pixels, "auto", or "none" (kept as text: None means not given)."""
    try:
        d = parse_diameter(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return "none" if d is None else d


def diameter_of(args: argparse.Namespace) -> float | str | None:
    """The diameter ``--diameter`` and ``--tile-size`` ask for (both set the scale: one at a time)."""
    given = getattr(args, "diameter", None)
    if given is None:  # not on the command line
        return None if args.tile_size is not None else DEFAULT_DIAMETER
    if given == "none":
        return None
    if args.tile_size is not None:
        raise ValueError("--diameter and --tile-size both set the scale: give one of them")
    return given


def params_of(args: argparse.Namespace) -> SegmentParams:
    """The segmentation parameters the options ask for (``ValueError`` for invalid ones)."""
    return SegmentParams(
        box_threshold=args.box_threshold,
        box_threshold_rel=args.box_threshold_rel,
        iou_threshold=args.iou_threshold,
        mask_threshold=args.mask_threshold,
        min_area=DEFAULT_MIN_AREA if args.min_area is None else args.min_area,
        min_area_rel=args.min_area_rel,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        diameter=diameter_of(args),
        polarity=args.polarity,
        batch_size=args.batch_size,
        decode_copies=args.decode_copies,
        decode_window=args.decode_window,
        flip_test=args.flip_test,
        progress=True,
        precision=args.precision,
    )


def file_options(args: argparse.Namespace) -> FileOptions:
    """How files are read and what is written besides the labels (``--channel-axis``, ``--channels``, ...)."""
    return FileOptions(
        channel_axis=args.channel_axis,
        channels=tuple(args.channels) if args.channels is not None else None,
        coco=bool(getattr(args, "coco", False)),
        max_pixels=getattr(args, "max_pixels", None),
    )


def _each_fails(paths: list[Path], error: ValueError) -> list[tuple[Path, str]]:
    """Invalid options fail every file with the same reason, each printed once."""
    from tqdm.auto import tqdm

    failed = [(path, failure_reason(path, error)) for path in paths]
    for path, why in failed:
        tqdm.write(f"{path}: FAILED: {why}")
    return failed


def run(args: argparse.Namespace) -> int:
    """Run ``cellsam segment``; returns 0 when every image was segmented, else 1."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from cellsam.io import find_images

    dask = getattr(args, "dask", None)
    if dask not in (None, "local") and ":" not in dask:  # `--dask IMAGE ...`: an input, not an address
        args.inputs, args.dask = [dask, *args.inputs], "local"
    inputs = list(args.inputs) + ([str(sample_path())] if args.sample else [])
    if not inputs:
        log.error("no inputs: give image files / folders / globs, or --sample")
        return 2
    paths, missing = find_images(inputs)
    for m in missing:
        log.error("%s: no images found", m)
    if not paths:
        return 1
    outdir = args.output or Path("cellsam_output")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission, ...
        log.error("cannot use %s as the output folder: %s", outdir, e)
        return 2
    on_dask = getattr(args, "dask", None) is not None
    try:  # also before --dask: a wrong model fails here once, not on every worker
        model = load_model(args.model, "cpu" if on_dask else args.device)
    except (KeyError, ValueError, OSError) as e:
        log.error("cannot load model %r: %s", args.model, e)
        return 1
    if on_dask:
        del model
        return run_dask(args, paths, len(missing), outdir)
    t0 = time.perf_counter()
    used: set[str] = set()
    done: list[tuple[Path, int]] = []
    failed: list[tuple[Path, str]] = []
    try:
        params, options = params_of(args), file_options(args)
    except ValueError as e:
        paths, failed = [], _each_fails(paths, e)
    with logging_redirect_tqdm():  # log lines go above the progress bars, not into them
        for path in tqdm(paths, desc="images", unit="image", disable=len(paths) < 2):
            try:
                n = segment_file(path, outdir, unique_name(path, used), model, params, options)
            except (ValueError, TypeError, OSError, MemoryError) as e:
                failed.append((path, failure_reason(path, e)))
                tqdm.write(f"{path}: FAILED: {failed[-1][1]}")  # once, as it happens, above the progress bar
                continue
            done.append((path, n))
            tqdm.write(f"{path}: {n} cell(s)")
    total = sum(n for _, n in done)
    print(
        f"cellsam segment: {len(done)} image(s) segmented, {total} cell(s), {len(failed) + len(missing)} "
        f"failed, {time.perf_counter() - t0:.1f} s; outputs in {outdir}"
    )
    if failed:
        print("  failed (reasons above): " + ", ".join(str(p) for p, _ in failed))
    return 1 if failed or missing else 0


def run_dask(args: argparse.Namespace, paths: list[Path], n_missing: int, outdir: Path) -> int:
    """``cellsam segment --dask [ADDRESS]``: returns 0 when every image was segmented, else 1.

    Files above ``LARGE_PIXELS`` or ``--max-pixels`` (read from their headers) go through the block pipeline
    (:func:`cellsam.distributed.files.segment_large_file`), the others are one task each.
    """
    from cellsam.distributed import files as F
    from cellsam.distributed.cluster import BlockFailure, close_client, get_client

    t0 = time.perf_counter()
    logging.getLogger("distributed").setLevel(logging.WARNING)  # ~30 INFO lines of cluster start-up otherwise
    address = None if args.dask in (None, "", "local") else args.dask
    try:
        client, owned = get_client(address)
    except (OSError, ValueError, TypeError) as e:
        log.error("cannot connect to the Dask scheduler %r: %s", args.dask, e)
        return 1
    used: set[str] = set()
    names = [unique_name(p, used) for p in paths]
    limit = min(F.LARGE_PIXELS, max_pixels(args))
    large = [F.image_pixels(p, args.channel_axis) > limit for p in paths]
    done: list[tuple[Path, int]] = []
    failed: list[tuple[Path, str]] = []
    try:
        params, options = params_of(args), file_options(args)
    except ValueError as e:
        large, failed = [], _each_fails(paths, e)
    try:
        small = [i for i, big in enumerate(large) if not big]
        if small:
            d, f = F.segment_files([paths[i] for i in small], [names[i] for i in small], outdir, params, options,
                                   args.model, args.device, client, reason=failure_reason)
            done, failed = done + d, failed + f
        for i in (i for i, big in enumerate(large) if big):
            try:
                done.append((paths[i], F.segment_large_file(paths[i], names[i], outdir, params, options,
                                                            args.model, args.device, client)))
            except (BlockFailure, ValueError, TypeError, OSError, MemoryError) as e:
                failed.append((paths[i], failure_reason(paths[i], e)))
                log.error("%s: %s", paths[i], failed[-1][1])
    finally:
        if owned:
            close_client(client)
    for path, n in done:
        print(f"{path}: {n} cell(s)")
    total = sum(n for _, n in done)
    print(
        f"cellsam segment (dask): {len(done)} image(s) segmented, {total} cell(s), {len(failed) + n_missing} "
        f"failed, {time.perf_counter() - t0:.1f} s; outputs in {outdir}"
    )
    for path, reason in failed:
        print(f"  FAILED {path}: {reason}")
    return 1 if failed or n_missing else 0
