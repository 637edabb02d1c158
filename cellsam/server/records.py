"""Records of a labeling project and their encoding: image records, edit results, label blobs,
safe file names, the SQLite transaction helper (used by :mod:`cellsam.server.storage`)."""

from __future__ import annotations

import io
import re
import sqlite3
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cellsam.server.edits import Window

# Edits by a person (the action names of routes_edit): an image with one of them (not undone) counts as
# corrected for fine-tuning. The model's own labels ("segment all", "decode boxes", "add boxes") and
# labels from a file ("import labels", "import") do not: mark such an image reviewed to train on it.
PERSON_ACTIONS = ("add cell (box)", "add cell (points)", "refine cell", "paint", "erase", "delete", "merge")


class ProjectError(ValueError):
    """A bad request against the project (unknown image, nothing to undo, bad path)."""


class NotFoundError(ProjectError):
    """An image id that is not in the project."""


@dataclass
class ImageRecord:
    """One image of the project. ``file`` is relative to the project root (posix)."""

    id: int
    name: str
    file: str
    height: int
    width: int
    n_channels: int
    channel_axis: int | None
    nuclear: int | None
    wholecell: int | None
    reviewed: bool
    n_cells: int = 0
    version: int = 0
    edits: int = 0
    person_edits: int = 0

    @property
    def corrected(self) -> bool:
        """A person edited its labels or marked it reviewed (and it has cells): fine-tuning uses it."""
        return self.n_cells > 0 and (self.reviewed or self.person_edits > 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EditResult:
    """What an edit / undo / redo did. ``patch`` is the new labels on ``window`` (None if unchanged)."""

    image_id: int
    action: str
    version: int
    base_version: int
    window: Window | None
    patch: np.ndarray | None
    n_cells: int
    cell: int | None
    can_undo: bool
    can_redo: bool
    edited: bool = False  # a person has edited the labels (see PERSON_ACTIONS)


def pack(arr: np.ndarray) -> bytes:
    """ndarray -> zlib'd .npy bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return zlib.compress(buf.getvalue(), 1)


def unpack(blob: bytes) -> np.ndarray:
    """Inverse of :func:`pack`."""
    return np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False)


def safe_filename(name: str) -> str:
    """A file name without folders or odd characters (uploads never choose where they land)."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip(".")
    if len(base) > 120:  # keep the suffix: the file is read by it
        stem, dot, suffix = base.rpartition(".")
        base = f"{stem[:110]}.{suffix}" if dot and stem and len(suffix) <= 9 else base[:120]
    return base or "image"


class Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


IMAGE_QUERY = (
    "SELECT i.*, l.n_cells AS n_cells, l.version AS version, "
    "(SELECT COUNT(*) FROM history h WHERE h.image_id=i.id AND h.undone=0) AS edits, "
    "(SELECT COUNT(*) FROM history h WHERE h.image_id=i.id AND h.undone=0 AND h.action IN ("
    + ", ".join(f"'{a}'" for a in PERSON_ACTIONS) + ")) AS person_edits "
    "FROM images i JOIN labels l ON l.image_id=i.id"
)


def record_from_row(row: sqlite3.Row) -> ImageRecord:
    return ImageRecord(
        id=int(row["id"]), name=str(row["name"]), file=str(row["file"]), height=int(row["height"]),
        width=int(row["width"]), n_channels=int(row["n_channels"]),
        channel_axis=None if row["channel_axis"] is None else int(row["channel_axis"]),
        nuclear=None if row["nuclear"] is None else int(row["nuclear"]),
        wholecell=None if row["wholecell"] is None else int(row["wholecell"]),
        reviewed=bool(row["reviewed"]), n_cells=int(row["n_cells"]), version=int(row["version"]),
        edits=int(row["edits"]), person_edits=int(row["person_edits"]),
    )


def default_channels(hwc: np.ndarray) -> tuple[int | None, int | None]:
    """Initial channel roles of an (H, W, C) image: 1 channel or an RGB(A) picture -> automatic
    (None, None); otherwise nuclear = channel 0 and whole-cell = channel 1 (the user can change it)."""
    c = hwc.shape[2]
    if c in (1, 3, 4):
        return None, None
    return 0, 1
