"""``cellsam prepare`` as a library function: sources -> standardised, tiled, split dataset.

Pass 1 reads every sample, rescales (optional), normalises channels into the CellSAM layout,
filters labels, finds the valid tiles and hashes the raw channels; standardised whole images
are parked in ``OUT/.work``. Pass 2 assigns splits (own split, else stable hash; cross-split
duplicates to train). Pass 3 writes each split (see :mod:`cellsam.data.writer`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.data import writer
from cellsam.data.labels import FILTERS, filter_labels
from cellsam.data.normalize import StainGrey, check_stain_grey, normalize_channel, to_cellsam_channels
from cellsam.data.readers import detect_format, read_source
from cellsam.data.sample import Sample, SampleError
from cellsam.data.splits import SPLITS, dhash, duplicate_groups, hash_split, resolve_duplicates
from cellsam.data.tiling import OVERLAP, TILE, crop, crop_origins

log = logging.getLogger(__name__)

LICENCES: dict[str, dict[str, str]] = {
    "dsb2018": {"licence": "CC0", "cite": "Caicedo et al., Nature Methods 16, 1247 (2019)"},
    "dsb2018_raw": {"licence": "CC0", "cite": "Caicedo et al., Nature Methods 16, 1247 (2019)"},
    "deepcell1": {
        "licence": "none stated; research use, cite the paper",
        "cite": "Van Valen et al., PLoS Comput Biol 12, e1005177 (2016)",
    },
    "monuseg": {
        "licence": "CC BY-NC-SA 4.0 (non-commercial)",
        "cite": "Kumar et al., IEEE TMI 36, 1550 (2017)",
    },
    "livecell": {
        "licence": "CC BY-NC 4.0 (non-commercial)",
        "cite": "Edlund et al., Nature Methods 18, 1038 (2021)",
    },
    "tissuenet": {
        "licence": "modified Apache 2.0, non-commercial",
        "cite": "Greenwald et al., Nat Biotech 40, 555 (2022)",
    },
    "synthetic": {"licence": "synthetic (cellsam.data.synthetic), no restriction", "cite": ""},
}
UNKNOWN_LICENCE = {"licence": "unknown: check the source before use", "cite": ""}


class PrepareError(RuntimeError):
    """A bad input when ``on_error="stop"``."""


@dataclass(frozen=True)
class PrepareOptions:
    """Options of :func:`prepare_dataset` (mirroring the CLI flags)."""

    fmt: str = "auto"
    target: str | None = None
    split_seed: int = 0
    rescale: float | None = None
    on_error: str = "skip"  # "skip" | "stop"
    tile: int = TILE
    overlap: float = OVERLAP
    max_hash_distance: int = 8
    full_images_for: tuple[str, ...] = ("val", "test")
    progress: bool = True
    stain_grey: StainGrey = "luminance"  # how stained colour pictures become grey (rgb_to_channel's stain)


@dataclass
class ImageRecord:
    """What pass 1 keeps of one source image (its pixels are parked on disk)."""

    index: int
    source: str
    image_id: str
    path: str
    files: dict[str, str]
    target: str
    kind: str
    roles: tuple[str, ...]
    shape: tuple[int, int]
    own_split: str | None
    hashes: list[np.ndarray]
    cells: int
    tiles: list[tuple[int, int, int]] = field(default_factory=list)  # (y0, x0, cells)
    split: str = "train"


def _tile_labels(labels: np.ndarray, y0: int, x0: int, tile: int) -> tuple[np.ndarray, dict[str, int]]:
    return filter_labels(crop(labels, y0, x0, tile=tile))


def standardise(sample: Sample, *, rescale: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rescale, normalise and lay out one sample.

    Returns:
        raw: (C, H', W') float raw channels after rescaling (for hashing);
        image: (3, H', W') float32 in [0, 1] (R empty, G nuclear, B whole-cell);
        labels: (H', W') int32 (unfiltered).
    """
    raw, labels = sample.image, sample.labels
    if rescale is not None and rescale != 1:
        from skimage.transform import rescale as sk_rescale

        raw = np.stack(
            [
                sk_rescale(c.astype(np.float64), rescale, order=3, preserve_range=True, anti_aliasing=False)
                for c in raw
            ]
        )
        labels = sk_rescale(labels, rescale, order=0, preserve_range=True, anti_aliasing=False).astype(
            np.int32
        )
    chans = {role: normalize_channel(c) for c, role in zip(raw, sample.roles, strict=True)}
    image = to_cellsam_channels(chans.get("nuclear"), chans.get("whole-cell"))
    return raw, image, labels


def _handle(err: SampleError, opts: PrepareOptions, errors: list[str]) -> None:
    errors.append(str(err))
    log.warning("skipped %s", err)
    if opts.on_error == "stop":
        raise PrepareError(str(err))


def _pass1(
    sources: list[Path], work: Path, opts: PrepareOptions, errors: list[str], drops: dict[str, Counter]
) -> tuple[list[ImageRecord], list[dict[str, Any]]]:
    from tqdm import tqdm

    records: list[ImageRecord] = []
    src_info = []
    for src in sources:
        try:
            fmt = detect_format(src) if opts.fmt == "auto" else opts.fmt
        except ValueError as e:
            _handle(SampleError(src, str(e).split(": ", 1)[-1]), opts, errors)
            continue
        name = src.stem if src.is_file() else src.name
        src_info.append(
            {"name": name, "path": str(src), "format": fmt, **LICENCES.get(name, UNKNOWN_LICENCE)}
        )
        it = read_source(src, fmt=fmt, target=opts.target, stain=opts.stain_grey)
        for s in tqdm(it, desc=f"prepare {name}", unit="img", disable=not opts.progress, leave=False):
            if isinstance(s, SampleError):
                _handle(s, opts, errors)
                continue
            try:
                raw, image, labels = standardise(s, rescale=opts.rescale)
            except (ValueError, TypeError) as e:
                _handle(SampleError(s.files.get("image", s.path), str(e)), opts, errors)
                continue
            labels, d = filter_labels(labels)
            drops[s.source].update(d)
            rec = ImageRecord(
                index=len(records),
                source=s.source,
                image_id=s.image_id,
                path=s.path,
                files=s.files,
                target=s.target,
                kind=s.kind,
                roles=s.roles,
                shape=labels.shape,
                own_split=s.split,
                hashes=[dhash(c) for c in raw],
                cells=int(labels.max()),
            )
            for y0, x0 in crop_origins(labels.shape, tile=opts.tile, overlap=opts.overlap):
                t, td = _tile_labels(labels, y0, x0, opts.tile)
                drops[s.source].update({f"tile_edge_{k}": v for k, v in td.items()})
                if t.max() > 0:
                    rec.tiles.append((y0, x0, int(t.max())))
            if not rec.tiles:
                drops[s.source]["images_without_labels"] += 1
                continue
            np.save(work / f"{rec.index}_image.npy", image)
            np.save(work / f"{rec.index}_labels.npy", labels)
            records.append(rec)
    return records, src_info


def assign_splits(records: list[ImageRecord], *, seed: int, max_distance: int) -> tuple[int, list[list[str]]]:
    """Set ``record.split`` for all records.

    Returns the number of images moved to train as duplicates, and the duplicate groups that
    spanned several splits (image paths; all now in train).
    """
    splits = []
    for r in records:
        own = r.own_split if r.own_split in SPLITS else None
        splits.append(own or hash_split(f"{r.source}/{r.image_id}", seed=seed))
    groups = duplicate_groups([r.hashes for r in records], max_distance=max_distance)
    new, moved = resolve_duplicates(splits, groups)
    moved_groups = sorted({g for g, a, b in zip(groups, splits, new, strict=True) if a != b})
    for r, s in zip(records, new, strict=True):
        r.split = s
    return moved, [[r.path for r, g in zip(records, groups, strict=True) if g == mg] for mg in moved_groups]


def _write_split(out: Path, work: Path, split: str, recs: list[ImageRecord], opts: PrepareOptions) -> None:
    sdir = out / split
    n = sum(len(r.tiles) for r in recs)
    images, labels_mm = writer.open_arrays(sdir, n, opts.tile)
    tiles: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    i = 0
    for r in recs:
        image = np.load(work / f"{r.index}_image.npy")
        labels = np.load(work / f"{r.index}_labels.npy")
        for y0, x0, cells in r.tiles:
            t, _ = _tile_labels(labels, y0, x0, opts.tile)
            images[i] = crop(image, y0, x0, tile=opts.tile)
            labels_mm[i, 0] = t
            tiles.append(
                {
                    "source": r.source,
                    "image": r.path,
                    "target": r.target,
                    "kind": r.kind,
                    "y0": y0,
                    "x0": x0,
                    "cells": cells,
                }
            )
            anns.extend(writer.coco_annotations(t, i, len(anns) + 1))
            i += 1
        entry = {
            "source": r.source,
            "image": r.path,
            "image_id": r.image_id,
            "target": r.target,
            "kind": r.kind,
            "channels": list(r.roles),
            "files": r.files,
            "height": r.shape[0],
            "width": r.shape[1],
            "cells": r.cells,
            "tiles": len(r.tiles),
        }
        if split in opts.full_images_for:
            (sdir / "full").mkdir(exist_ok=True)
            k = len(entries)
            shutil.copyfile(work / f"{r.index}_image.npy", sdir / "full" / f"{k:05d}_image.npy")
            shutil.copyfile(work / f"{r.index}_labels.npy", sdir / "full" / f"{k:05d}_labels.npy")
            entry["image_npy"] = f"{split}/full/{k:05d}_image.npy"
            entry["labels_npy"] = f"{split}/full/{k:05d}_labels.npy"
        entries.append(entry)
    images.flush()
    labels_mm.flush()
    del images, labels_mm
    writer.write_json(sdir / "tiles.json", tiles)
    writer.write_json(sdir / "images.json", entries)
    writer.write_json(sdir / "coco.json", writer.coco_document(split, tiles, anns, opts.tile), compact=True)


def summarise(records: list[ImageRecord], drops: dict[str, Counter]) -> dict[str, Any]:
    """Counts per split, per source, per (split, source), and per data type."""

    def count(rs: list[ImageRecord]) -> dict[str, int]:
        return {
            "images": len(rs),
            "tiles": sum(len(r.tiles) for r in rs),
            "cells": sum(r.cells for r in rs),
            "tile_cells": sum(c for r in rs for *_, c in r.tiles),
        }

    by: dict[str, dict[str, list[ImageRecord]]] = {
        "split": defaultdict(list),
        "source": defaultdict(list),
        "split_source": defaultdict(list),
        "kind": defaultdict(list),
    }
    for r in records:
        by["split"][r.split].append(r)
        by["source"][r.source].append(r)
        by["split_source"][f"{r.split}/{r.source}"].append(r)
        by["kind"][f"{r.target} | {r.kind}"].append(r)
    report = {name: {k: count(v) for k, v in sorted(groups.items())} for name, groups in by.items()}
    for s in SPLITS:
        report["split"].setdefault(s, count([]))
    report["dropped"] = {src: dict(sorted(c.items())) for src, c in sorted(drops.items())}
    return report


def prepare_dataset(
    sources: list[str | Path],
    out: str | Path,
    *,
    options: PrepareOptions | None = None,
    command: str = "",
    version: str = "",
    stats: bool = False,
) -> dict[str, Any]:
    """Prepare a training dataset from annotated sources into ``out``; returns the ``dataset.json``
    content (also written). With ``stats`` also writes ``stats.json`` (cells per data type).

    Raises :class:`PrepareError` on the first bad input when ``options.on_error == "stop"``, and
    ``ValueError`` when nothing usable was found.
    """
    opts = options or PrepareOptions()
    if opts.on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {opts.on_error!r}")
    if opts.rescale is not None and not opts.rescale > 0:
        raise ValueError(f"rescale must be > 0, got {opts.rescale}")
    check_stain_grey(opts.stain_grey)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    errors: list[str] = []
    drops: dict[str, Counter] = defaultdict(lambda: Counter(dict.fromkeys(FILTERS, 0)))
    try:
        records, src_info = _pass1([Path(s) for s in sources], work, opts, errors, drops)
        if not records:
            raise ValueError("no usable annotated images found in " + ", ".join(map(str, sources)))
        moved, dup_groups = assign_splits(records, seed=opts.split_seed, max_distance=opts.max_hash_distance)
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
            recs = [r for r in records if r.split == split]
            _write_split(out, work, split, recs, opts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = summarise(records, drops)
    for s in src_info:
        s.update(report["source"].get(s["name"], {"images": 0, "tiles": 0, "cells": 0, "tile_cells": 0}))
    manifest = {
        "format_version": 1,
        "cellsam_version": version,
        "command": command,
        "options": {
            "format": opts.fmt,
            "target": opts.target,
            "split_seed": opts.split_seed,
            "rescale": opts.rescale,
            "tile": opts.tile,
            "overlap": opts.overlap,
            "max_hash_distance": opts.max_hash_distance,
            "stain_grey": opts.stain_grey,
        },
        "layout": {
            "images": "(N,3,T,T) float32 in [0,1]; R empty, G nuclear, B whole-cell (single channel in B)",
            "labels": "(N,1,T,T) int32; 0 background, 1..n per tile",
        },
        "sources": src_info,
        "counts": report,
        "duplicates_moved_to_train": moved,
        "duplicate_groups_moved_to_train": dup_groups,
        "errors": errors,
    }
    (out / "stats.json").unlink(missing_ok=True)
    if stats:
        writer.write_json(out / "stats.json", {"cells_per_data_type": report["kind"]})
    manifest["checksums"] = writer.checksums(out, list(SPLITS), ["stats.json"])
    writer.write_json(out / "dataset.json", manifest)
    return manifest


def dataset_stain_grey(root: str | Path) -> StainGrey:
    """How the prepared dataset at ``root`` turned stained colour pictures into grey (its ``dataset.json``'s
    ``options.stain_grey``; ``"luminance"`` for datasets prepared before the option existed or without a
    ``dataset.json``). A model trained on it must prepare such pictures the same way."""
    f = Path(root) / "dataset.json"
    if not f.is_file():
        return "luminance"
    value = json.loads(f.read_text()).get("options", {}).get("stain_grey", "luminance")
    return check_stain_grey(value, f"{f}: options.stain_grey")
