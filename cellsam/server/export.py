"""Exports of a project's labels: label TIFF / PNG, COCO JSON, and a ``*_img`` / ``*_masks`` folder.

The pairs folder is the Cellpose convention that :func:`cellsam.data.readers.read_pairs` (and so
``cellsam prepare``) reads: ``<name>_img.tif`` holds the raw image with the roles the user chose
(one channel (H, W); nuclear + whole-cell as a (2, H, W) stack; an RGB picture as (H, W, 3)) and
``<name>_masks.tif`` the labels renumbered 1..n. :func:`write_pairs_folder` writes it under a
temporary name and renames it when every file is written, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.server.edits import relabel_sequential
from cellsam.server.images import load_raw
from cellsam.server.storage import ImageRecord, Project


def select(project: Project, *, reviewed_only: bool = False, ids: list[int] | None = None) -> list[ImageRecord]:
    """The images to export: all, the reviewed ones, or those in ``ids``."""
    recs = project.images()
    if ids is not None:
        want = set(ids)
        recs = [r for r in recs if r.id in want]
    if reviewed_only:
        recs = [r for r in recs if r.reviewed]
    return recs


def export_labels(project: Project, image_id: int) -> np.ndarray:
    """(H, W) int32 labels renumbered 1..n."""
    return relabel_sequential(np.asarray(project.labels(image_id)[1]))


def label_tiff_bytes(labels: np.ndarray) -> bytes:
    """zlib-compressed TIFF, uint16 (uint32 above 65535 cells), as :func:`cellsam.io.write_labels`."""
    import tifffile

    dtype = np.uint16 if int(labels.max(initial=0)) <= 65535 else np.uint32
    buf = io.BytesIO()
    tifffile.imwrite(buf, labels.astype(dtype), compression="zlib")
    return buf.getvalue()


def label_png_bytes(labels: np.ndarray) -> bytes:
    """16-bit greyscale PNG; more than 65535 cells raises ``ValueError`` (use TIFF)."""
    from cellsam.server.images import png_bytes

    if int(labels.max(initial=0)) > 65535:
        raise ValueError("more than 65535 cells do not fit a 16-bit PNG; export a TIFF instead")
    return png_bytes(labels.astype(np.uint16))


def stem(rec: ImageRecord) -> str:
    """A unique file stem per image: ``<id>_<name without extension>``."""
    from cellsam.io import image_name
    from cellsam.server.storage import safe_filename

    return f"{rec.id:05d}_{safe_filename(image_name(Path(rec.name)))}"


def coco_document(project: Project, recs: list[ImageRecord]) -> dict[str, Any]:
    """COCO instances of the images (RLE masks, xywh boxes, areas); image ids are the project ids."""
    from cellsam.io import coco_dict

    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for rec in recs:
        d = coco_dict(export_labels(project, rec.id), None, rec.name, image_id=rec.id)
        images += d["images"]
        for a in d["annotations"]:
            a["id"] = len(anns) + 1
            a.pop("score", None)
            anns.append(a)
    return {
        "info": {"description": f"cellsam project {project.root.name}"},
        "images": images,
        "categories": [{"id": 1, "name": "cell"}],
        "annotations": anns,
    }


def pairs_image(project: Project, rec: ImageRecord) -> np.ndarray:
    """The raw image laid out for the pairs reader (see the module docstring)."""
    raw = load_raw(project.image_path(rec), rec)  # (H, W, C)
    if rec.nuclear is not None and rec.wholecell is not None:
        return np.stack([raw[..., rec.nuclear], raw[..., rec.wholecell]])
    if rec.nuclear is not None or rec.wholecell is not None:
        return raw[..., rec.wholecell if rec.wholecell is not None else rec.nuclear]
    return raw[..., 0] if raw.shape[2] == 1 else raw


class ExportError(ValueError):
    """An image of the project cannot be exported (its file is missing or unreadable)."""


def write_pairs(project: Project, out: str | Path, recs: list[ImageRecord]) -> list[Path]:
    """Write ``<stem>_img.tif`` + ``<stem>_masks.tif`` per image into ``out``; returns the image files.

    Raises:
        ExportError: an image cannot be read (files written so far stay: see :func:`write_pairs_folder`).
    """
    import tifffile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rec in recs:
        s = stem(rec)
        img = _readable(project, rec)
        tifffile.imwrite(out / f"{s}_img.tif", img, photometric="rgb" if img.ndim == 3 and img.shape[-1] in (3, 4)
                         and img.dtype == np.uint8 else "minisblack")
        (out / f"{s}_masks.tif").write_bytes(label_tiff_bytes(export_labels(project, rec.id)))
        written.append(out / f"{s}_img.tif")
    (out / "README.txt").write_text(
        "Exported by cellsam serve: <name>_img.tif + <name>_masks.tif pairs.\n"
        f"Prepare them for training with:  cellsam prepare {out} --out PREPARED\n"
    )
    return written


def write_pairs_folder(project: Project, recs: list[ImageRecord], *, parent: str = "exports") -> Path:
    """Write the pairs of ``recs`` into a new ``<project>/<parent>/pairs-<time>`` folder, atomically:
    into a hidden temporary folder first, renamed when complete (removed on any error)."""
    base = project.resolve(parent)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pairs-", suffix=".part", dir=base))
    try:
        write_pairs(project, tmp, recs)
        final = _free_name(base, f"pairs-{time.strftime('%Y%m%d-%H%M%S')}")
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _free_name(base: Path, name: str) -> Path:
    """``base/name``, or ``base/name-2``, ``-3``... when taken (two exports in one second)."""
    out, k = base / name, 2
    while out.exists():
        out, k = base / f"{name}-{k}", k + 1
    return out


def _readable(project: Project, rec: ImageRecord) -> np.ndarray:
    """:func:`pairs_image`, with a read failure worded for the user."""
    try:
        return pairs_image(project, rec)
    except (OSError, ValueError) as e:
        raise ExportError(f"image {rec.id} ({rec.name}) cannot be read ({e}); delete it from the project "
                          "(Delete image) and export again") from None


def zip_folder(folder: Path) -> bytes:
    """The files of ``folder`` (not recursive) as a zip archive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                z.write(f, arcname=f"{folder.name}/{f.name}")
    return buf.getvalue()


def coco_bytes(project: Project, recs: list[ImageRecord]) -> bytes:
    return json.dumps(coco_document(project, recs)).encode()
