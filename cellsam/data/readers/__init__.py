"""Readers of annotated data layouts, one module each, behind one interface.

Every reader is ``read_<layout>(path) -> Iterator[Sample | SampleError]``: a bad file yields
a :class:`~cellsam.data.sample.SampleError` (one clear message) and reading goes on.
:func:`read_source` picks the reader (``detect_format`` for "auto") and fills each sample's
``target`` / ``kind`` from a ``manifest.csv`` (columns image, target, kind) found in the
source folder or its parent, else from the ``target`` argument.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

from cellsam.data.normalize import StainGrey
from cellsam.data.readers.coco import find_files as _coco_files
from cellsam.data.readers.coco import read_coco
from cellsam.data.readers.dsb import find_samples as _dsb_samples
from cellsam.data.readers.dsb import read_dsb
from cellsam.data.readers.multichannel import find_names as _mc_names
from cellsam.data.readers.multichannel import read_multichannel
from cellsam.data.readers.npz import find_files as _npz_files
from cellsam.data.readers.npz import read_npz
from cellsam.data.readers.pairs import find_pairs as _pairs
from cellsam.data.readers.pairs import read_pairs
from cellsam.data.sample import Role, Sample, SampleError, Target

FORMATS = ("pairs", "dsb", "npz", "coco", "multichannel")
TARGETS: tuple[Role, ...] = ("nuclear", "whole-cell")
_ROLES: dict[str, Role] = {t: t for t in TARGETS}  # target text -> the channel role it names

__all__ = [
    "FORMATS",
    "TARGETS",
    "detect_format",
    "read_source",
    "load_manifest",
    "read_pairs",
    "read_dsb",
    "read_npz",
    "read_coco",
    "read_multichannel",
]


def detect_format(path: str | Path) -> str:
    """Name of the layout at ``path`` (one of :data:`FORMATS`); ``ValueError`` if none fits."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: does not exist")
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return "npz"
        if path.suffix.lower() == ".json":
            return "coco"
        raise ValueError(f"{path}: unknown layout (a single file must be .npz or COCO .json)")
    if not any(path.iterdir()):
        raise ValueError(f"{path}: empty folder")
    if _pairs(path):
        return "pairs"
    if _mc_names(path):
        return "multichannel"
    if _dsb_samples(path):
        return "dsb"
    if _npz_files(path):
        return "npz"
    if _coco_files(path):
        return "coco"
    raise ValueError(
        f"{path}: unknown layout; expected *_img/*_masks pairs, <name>_phase|_nuclear + <name>_masks, "
        "<id>/images + <id>/masks (DSB), .npz with X/y, or COCO .json"
    )


def load_manifest(source: Path) -> tuple[Path, dict[str, dict[str, str]]] | None:
    """``(folder, {image path relative to folder: row})`` of the manifest.csv beside ``source``."""
    source = Path(source)
    for folder in ((source if source.is_dir() else source.parent), source.parent):
        f = folder / "manifest.csv"
        if f.is_file():
            with open(f, newline="", encoding="utf-8") as fh:
                rows = {r["image"]: r for r in csv.DictReader(fh) if r.get("image")}
            return folder.resolve(), rows
    return None


def _reader(fmt: str, target: str | None, stain: StainGrey) -> Callable[[Path], Iterator[Sample | SampleError]]:
    if fmt == "npz":
        return lambda p: read_npz(p, target=target)  # arrays of channels: no colour pictures
    read = {"pairs": read_pairs, "dsb": read_dsb, "coco": read_coco, "multichannel": read_multichannel}[fmt]
    return lambda p: read(p, stain=stain)


def read_source(
    path: str | Path, *, fmt: str = "auto", target: str | None = None, stain: StainGrey = "luminance"
) -> Iterator[Sample | SampleError]:
    """Read every sample of one source folder/file, with target and kind filled in.

    Args:
        path: the source (folder, or a .npz / .json file).
        fmt: "auto" or one of :data:`FORMATS`.
        target: "nuclear" / "whole-cell" for images the manifest does not cover (None: "unknown").
        stain: how stained bright-field colour pictures become grey (``rgb_to_channel``'s ``stain``).
    """
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose auto or one of {FORMATS}")
    if target is not None and target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    if fmt == "auto":
        try:
            fmt = detect_format(path)
        except ValueError as e:
            yield SampleError(path, str(e).split(": ", 1)[-1])
            return
    manifest = load_manifest(path)
    for s in _reader(fmt, target, stain)(path):
        if isinstance(s, Sample) and manifest is not None:
            folder, rows = manifest
            primary = Path(s.files.get("image") or s.files.get("whole-cell") or s.files.get("nuclear") or "")
            try:
                key = primary.resolve().relative_to(folder).as_posix()
            except ValueError:
                key = ""
            row = rows.get(key)
            if row is not None:
                s.target = cast(Target, row.get("target") or s.target)  # the manifest's text, not checked
                s.kind = row.get("kind") or s.kind
                if row.get("split"):
                    s.split = row["split"]
        if isinstance(s, Sample) and s.target == "unknown" and target is not None:
            s.target = _ROLES[target]  # checked above
        if isinstance(s, Sample) and len(s.roles) == 1 and s.target in _ROLES:
            s.roles = (_ROLES[s.target],)  # a lone channel shows what is labelled; it goes to blue either way
        yield s
