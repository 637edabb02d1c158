"""A labeling project: a folder with an SQLite database (WAL) that never loses a confirmed edit.

Layout of a project folder ``ROOT``::

    ROOT/cellsam_project.db      images, current labels (zlib'd .npy blobs), edit history, settings
    ROOT/images/NNNNN_name.ext   uploaded images (images found in ROOT itself are used in place)
    ROOT/exports/, ROOT/finetune/ written on request

Every edit runs in one ``BEGIN IMMEDIATE`` transaction (read current labels, apply, write labels +
undo record, commit) before the caller replies; with ``synchronous=FULL`` a committed edit survives
a killed process. Undo records hold only the changed window (before and after crops). Several
processes may open the same project: each edit re-reads the labels when their version changed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cellsam.server.edits import Window, changed_window, n_cells
from cellsam.server.records import (
    IMAGE_QUERY,
    PERSON_ACTIONS,
    EditResult,
    ImageRecord,
    NotFoundError,
    ProjectError,
    Transaction,
    default_channels,
    pack,
    record_from_row,
    safe_filename,
    unpack,
)

__all__ = ["DB_NAME", "MAX_HISTORY", "Project", "ProjectError", "NotFoundError", "ImageRecord", "EditResult",
           "pack", "unpack", "safe_filename"]

DB_NAME = "cellsam_project.db"
IMAGES_DIR = "images"
MAX_HISTORY = 200  # undo records kept per image
LABEL_SUFFIXES = ("_masks", "_labels", "_mask", "_label")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, file TEXT NOT NULL,
    height INTEGER NOT NULL, width INTEGER NOT NULL, n_channels INTEGER NOT NULL,
    channel_axis INTEGER, nuclear INTEGER, wholecell INTEGER,
    reviewed INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    version INTEGER NOT NULL, n_cells INTEGER NOT NULL, data BLOB NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    action TEXT NOT NULL, detail TEXT NOT NULL, y0 INTEGER, x0 INTEGER, y1 INTEGER, x1 INTEGER,
    before BLOB NOT NULL, after BLOB NOT NULL, undone INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS history_image ON history(image_id, undone, id);
"""


class Project:
    """An open project folder. Thread-safe: one connection, one lock."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / DB_NAME
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        self._cache: OrderedDict[int, tuple[int, np.ndarray]] = OrderedDict()

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, *, import_images: bool = True) -> Project:
        """Open ``path``: an existing project, a folder of images (imported in place, with their
        ``*_masks`` / ``*_labels`` files as labels), a ``cellsam_project.db`` file, or a new folder."""
        from cellsam.io import ImageReadError, find_images, load_image

        p = Path(path)
        if p.is_file():
            if p.name != DB_NAME:
                raise ProjectError(f"{p} is a file; give a project folder or a folder of images")
            p = p.parent
        fresh = not (p / DB_NAME).exists()
        project = cls(p)
        if fresh and import_images and any(project.root.iterdir()):
            found, _ = find_images([project.root])
            names = {f.stem: f for f in found}
            for f in found:
                if any(f.stem.endswith(s) for s in LABEL_SUFFIXES):
                    continue
                try:
                    loaded = load_image(f)
                    rec = project.add_image(f.name, loaded.data, channel_axis=loaded.channel_axis, file=f)
                except (ImageReadError, ValueError) as e:
                    import logging

                    logging.getLogger(__name__).warning("not imported: %s", e)
                    continue
                base = f.stem[:-4] if f.stem.endswith("_img") else f.stem
                for suffix in LABEL_SUFFIXES:
                    lab = names.get(base + suffix)
                    if lab is not None:
                        project.set_labels(rec.id, load_image(lab).data, action="import")
                        break
        return project

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ------------------------------------------------------------------ paths and meta
    def resolve(self, rel: str) -> Path:
        """Absolute path of a project-relative path; refuses anything outside the project folder."""
        p = (self.root / rel).resolve()
        if p != self.root and self.root not in p.parents:
            raise ProjectError(f"path {rel!r} leaves the project folder")
        return p

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ images
    def add_image(
        self,
        name: str,
        data: np.ndarray,
        *,
        channel_axis: int | None,
        file: Path | None = None,
        content: bytes | None = None,
        file_name: str | None = None,
    ) -> ImageRecord:
        """Register an image. ``file``: an existing file inside the project (used in place);
        else ``content`` (the uploaded bytes) is written to ``images/`` as ``NNNNN_<file_name or name>``
        (made safe). Labels start empty."""
        from cellsam.inference.preprocess import to_channels_last

        hwc = to_channels_last(data, channel_axis=channel_axis)  # validates shape / dtype
        h, w, c = hwc.shape
        nuclear, wholecell = default_channels(hwc)
        now = time.time()
        with self._lock, self._txn():
            cur = self._conn.execute(
                "INSERT INTO images(name, file, height, width, n_channels, channel_axis, nuclear, wholecell, "
                "created) VALUES (?, '', ?, ?, ?, ?, ?, ?, ?)",
                (name, h, w, c, channel_axis, nuclear, wholecell, now),
            )
            assert cur.lastrowid is not None  # sqlite3 sets it after every INSERT
            image_id = int(cur.lastrowid)
            if file is not None:
                rel = self.resolve(str(Path(file).resolve().relative_to(self.root))).relative_to(self.root)
            else:
                if content is None:
                    raise ValueError("add_image needs either file= or content=")
                rel = Path(IMAGES_DIR) / f"{image_id:05d}_{safe_filename(file_name or name)}"
                dest = self.resolve(rel.as_posix())
                dest.parent.mkdir(exist_ok=True)
                tmp = dest.with_name(dest.name + ".part")
                with open(tmp, "wb") as f:
                    f.write(content)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, dest)
            self._conn.execute("UPDATE images SET file=? WHERE id=?", (rel.as_posix(), image_id))
            empty = np.zeros((h, w), np.int32)
            self._conn.execute(
                "INSERT INTO labels(image_id, version, n_cells, data, updated) VALUES (?, 0, 0, ?, ?)",
                (image_id, pack(empty), now),
            )
        return self.image(image_id)

    def image_path(self, rec: ImageRecord) -> Path:
        return self.resolve(rec.file)

    def images(self) -> list[ImageRecord]:
        with self._lock:
            rows = self._conn.execute(IMAGE_QUERY + " ORDER BY i.id").fetchall()
        return [record_from_row(r) for r in rows]

    def image(self, image_id: int) -> ImageRecord:
        if not 0 < int(image_id) < 2**63:  # SQLite's integers: a larger id would overflow, not be missing
            raise NotFoundError(f"no image with id {image_id} in this project")
        with self._lock:
            row = self._conn.execute(IMAGE_QUERY + " WHERE i.id=?", (int(image_id),)).fetchone()
        if row is None:
            raise NotFoundError(f"no image with id {image_id} in this project")
        return record_from_row(row)

    def update_image(self, image_id: int, **fields: Any) -> ImageRecord:
        """Change ``nuclear``, ``wholecell`` (channel indices or None) and / or ``reviewed``."""
        rec = self.image(image_id)
        allowed = {"nuclear", "wholecell", "reviewed"}
        bad = set(fields) - allowed
        if bad:
            raise ProjectError(f"cannot change {sorted(bad)}; only {sorted(allowed)}")
        for key in ("nuclear", "wholecell"):
            v = fields.get(key, getattr(rec, key))
            if v is not None and not 0 <= int(v) < rec.n_channels:
                raise ProjectError(f"{key} channel {v} out of range: the image has {rec.n_channels} channel(s)")
        nuc, wc = fields.get("nuclear", rec.nuclear), fields.get("wholecell", rec.wholecell)
        if nuc is None and wc is None and rec.n_channels not in (1, 3, 4):
            raise ProjectError("choose at least one channel (nuclear or whole-cell) for this image")
        with self._lock, self._txn():
            self._conn.execute(
                "UPDATE images SET nuclear=?, wholecell=?, reviewed=? WHERE id=?",
                (nuc, wc, int(bool(fields.get("reviewed", rec.reviewed))), rec.id),
            )
        return self.image(image_id)

    def delete_image(self, image_id: int) -> None:
        """Forget an image (and delete its file when it was uploaded into ``images/``)."""
        rec = self.image(image_id)
        with self._lock, self._txn():
            self._conn.execute("DELETE FROM history WHERE image_id=?", (rec.id,))
            self._conn.execute("DELETE FROM labels WHERE image_id=?", (rec.id,))
            self._conn.execute("DELETE FROM images WHERE id=?", (rec.id,))
        self._cache.pop(rec.id, None)
        if rec.file.startswith(IMAGES_DIR + "/"):
            self.resolve(rec.file).unlink(missing_ok=True)

    # ------------------------------------------------------------------ labels
    def labels(self, image_id: int) -> tuple[int, np.ndarray]:
        """(version, labels (H, W) int32, read-only)."""
        with self._lock:
            return self._current(int(image_id))

    def _current(self, image_id: int) -> tuple[int, np.ndarray]:
        row = self._conn.execute("SELECT version FROM labels WHERE image_id=?", (image_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no image with id {image_id} in this project")
        version = int(row[0])
        hit = self._cache.get(image_id)
        if hit is not None and hit[0] == version:
            self._cache.move_to_end(image_id)
            return hit
        blob = self._conn.execute("SELECT data FROM labels WHERE image_id=?", (image_id,)).fetchone()[0]
        arr = unpack(blob)
        self._remember(image_id, version, arr)
        return version, arr

    def _remember(self, image_id: int, version: int, arr: np.ndarray) -> None:
        arr.flags.writeable = False
        self._cache[image_id] = (version, arr)
        self._cache.move_to_end(image_id)
        while len(self._cache) > 4:
            self._cache.popitem(last=False)

    def edit(
        self,
        image_id: int,
        action: str,
        fn: Callable[[np.ndarray], tuple[np.ndarray, int | None]],
        *,
        detail: dict[str, Any] | None = None,
    ) -> EditResult:
        """Apply ``fn(labels) -> (new labels, cell id)`` and commit it with an undo record.

        ``fn`` sees the latest committed labels (read inside the transaction), so concurrent edits
        of one image are applied one after the other and none is lost. A ``ValueError`` from ``fn``
        rolls back and propagates. An edit that changes nothing is not recorded.
        """
        image_id = int(image_id)
        with self._lock, self._txn():
            base, labels = self._current(image_id)
            new, cell = fn(labels)
            new = np.asarray(new)
            if new.shape != labels.shape:
                raise ValueError(f"labels of shape {new.shape} do not fit the image {labels.shape}")
            new = new.astype(np.int32, copy=False)
            win = changed_window(labels, new)
            if win is None:
                return self._result(image_id, action, base, base, None, None, labels, cell)
            y0, x0, y1, x1 = win
            now = time.time()
            self._conn.execute("DELETE FROM history WHERE image_id=? AND undone=1", (image_id,))
            self._conn.execute(
                "INSERT INTO history(image_id, action, detail, y0, x0, y1, x1, before, after, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (image_id, action, json.dumps(detail or {}), y0, x0, y1, x1,
                 pack(labels[y0:y1, x0:x1]), pack(new[y0:y1, x0:x1]), now),
            )
            self._conn.execute(
                "DELETE FROM history WHERE image_id=? AND id NOT IN "
                "(SELECT id FROM history WHERE image_id=? ORDER BY id DESC LIMIT ?)",
                (image_id, image_id, MAX_HISTORY),
            )
            version = self._write_labels(image_id, base, new, now)
            return self._result(image_id, action, version, base, win, new, new, cell)

    def set_labels(self, image_id: int, labels: np.ndarray, *, action: str = "set") -> EditResult:
        """Replace all labels (import, segment all) as one undoable edit."""
        from cellsam.data.sample import SampleError, check_labels

        try:
            lab = check_labels(np.asarray(labels), Path(action))
        except SampleError as e:
            raise ValueError(f"bad label image: {e.message}") from None  # the request's fault: 400
        return self.edit(image_id, action, lambda _old: (lab, None))

    def _write_labels(self, image_id: int, base: int, new: np.ndarray, now: float) -> int:
        version = base + 1
        cur = self._conn.execute(
            "UPDATE labels SET version=?, n_cells=?, data=?, updated=? WHERE image_id=? AND version=?",
            (version, n_cells(new), pack(new), now, image_id, base),
        )
        if cur.rowcount != 1:  # impossible inside BEGIN IMMEDIATE; guards against a schema mix-up
            raise ProjectError("the labels changed during the edit; try again")
        self._remember(image_id, version, np.array(new, np.int32))
        return version

    def undo(self, image_id: int) -> EditResult:
        return self._step(int(image_id), undo=True)

    def redo(self, image_id: int) -> EditResult:
        return self._step(int(image_id), undo=False)

    def _step(self, image_id: int, *, undo: bool) -> EditResult:
        order, flag = ("DESC", 0) if undo else ("ASC", 1)
        with self._lock, self._txn():
            base, labels = self._current(image_id)
            row = self._conn.execute(
                f"SELECT id, action, y0, x0, y1, x1, before, after FROM history WHERE image_id=? AND undone=? "
                f"ORDER BY id {order} LIMIT 1",
                (image_id, flag),
            ).fetchone()
            if row is None:
                raise ProjectError("nothing to undo" if undo else "nothing to redo")
            y0, x0, y1, x1 = (int(row[k]) for k in ("y0", "x0", "y1", "x1"))
            new = np.array(labels, np.int32)
            new[y0:y1, x0:x1] = unpack(row["before"] if undo else row["after"])
            self._conn.execute("UPDATE history SET undone=? WHERE id=?", (1 - flag, row["id"]))
            version = self._write_labels(image_id, base, new, time.time())
            action = ("undo " if undo else "redo ") + str(row["action"])
            return self._result(image_id, action, version, base, (y0, x0, y1, x1), new, new, None)

    def history(self, image_id: int) -> tuple[int, int]:
        """(number of undoable edits, number of redoable edits)."""
        with self._lock:
            return self._counts(int(image_id))

    def _counts(self, image_id: int) -> tuple[int, int]:
        rows = self._conn.execute(
            "SELECT undone, COUNT(*) FROM history WHERE image_id=? GROUP BY undone", (image_id,)
        ).fetchall()
        d = {int(r[0]): int(r[1]) for r in rows}
        return d.get(0, 0), d.get(1, 0)

    def _result(
        self, image_id: int, action: str, version: int, base: int, win: Window | None,
        new: np.ndarray | None, current: np.ndarray, cell: int | None,
    ) -> EditResult:
        n_undo, n_redo = self._counts(image_id)
        patch = None
        if win is not None and new is not None:
            patch = np.array(new[win[0] : win[2], win[1] : win[3]], np.int32)
        person = self._conn.execute(
            "SELECT COUNT(*) FROM history WHERE image_id=? AND undone=0 AND action IN "
            f"({', '.join('?' * len(PERSON_ACTIONS))})", (image_id, *PERSON_ACTIONS),
        ).fetchone()[0]
        return EditResult(image_id, action, version, base, win, patch, n_cells(current), cell,
                          n_undo > 0, n_redo > 0, edited=int(person) > 0)

    # ------------------------------------------------------------------ transactions
    def _txn(self) -> Transaction:
        return Transaction(self._conn)


