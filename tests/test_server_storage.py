"""Server building blocks without HTTP: label edits, the project database, the LRU cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellsam.server import edits
from cellsam.server.session import LRUCache
from cellsam.server.storage import MAX_HISTORY, Project, ProjectError, pack, safe_filename, unpack


def test_place_mask_keeps_other_cells_unless_overwrite() -> None:
    labels = np.zeros((10, 10), np.int32)
    labels[2:5, 2:5] = 1
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True  # covers (3..6, 3..6) at offset (2, 2)
    out, lab = edits.place_mask(labels, mask, y0=2, x0=2)
    assert lab == 2 and (out[2:5, 2:5] == 1).all() and (out[5:7, 3:7] == 2).all() and (out[3:5, 5:7] == 2).all()
    out, lab = edits.place_mask(labels, mask, y0=2, x0=2, overwrite=True)
    assert (out[3:7, 3:7] == 2).all() and (out == 1).sum() == 9 - 4
    # redraw cell 1 elsewhere: its old pixels are cleared
    out, lab = edits.place_mask(labels, np.ones((2, 2), bool), y0=8, x0=8, label=1)
    assert lab == 1 and (out == 1).sum() == 4 and (out[8:, 8:] == 1).all()
    with pytest.raises(ValueError, match="empty"):
        edits.place_mask(labels, np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="outside"):
        edits.place_mask(labels, np.ones((3, 3), bool), y0=20, x0=0)
    with pytest.raises(ValueError, match="only cover other cells"):
        edits.place_mask(labels, np.ones((3, 3), bool), y0=2, x0=2)


def test_delete_merge_paint_erase() -> None:
    labels = np.zeros((20, 20), np.int32)
    labels[0:5, 0:5], labels[10:15, 10:15], labels[0:3, 15:18] = 3, 7, 9
    out = edits.delete_cells(labels, [7])
    assert not (out == 7).any() and (out == 3).sum() == 25
    with pytest.raises(ValueError, match="no such cell"):
        edits.delete_cells(labels, [4])
    out, lab = edits.merge_cells(labels, [9, 7])
    assert lab == 7 and (out == 7).sum() == 25 + 9 and not (out == 9).any()
    out, lab = edits.paint(labels, [(2.5, 12.5)], 1.5, label=None)
    assert lab == 10 and out[12, 2] == 10 and (out == 3).sum() == 25
    out, _ = edits.paint(labels, [(2.5, 2.5), (2.5, 9.5)], 1.0, label=None, erase=True)
    assert out[2, 2] == 0 and out[0, 0] == 3 and (out == 7).sum() == 25
    out, _ = edits.paint(labels, [(12.5, 12.5)], 1.0, label=3, erase=True)  # erases only cell 3: nothing here
    np.testing.assert_array_equal(out, labels)
    with pytest.raises(ValueError, match="radius"):
        edits.paint(labels, [(1, 1)], 0.1, label=None)


def test_stroke_is_connected_and_clipped() -> None:
    mask, y0, x0 = edits.stroke_mask((50, 50), [(5, 5), (45, 5)], 2)
    assert (y0, x0) == (3, 3)
    assert mask[5 - y0, 5 - x0 : 45 - x0].all()  # no gaps between far-apart samples
    mask, y0, x0 = edits.stroke_mask((50, 50), [(-100, -100)], 3)
    assert mask.size == 0


def test_changed_window_and_relabel() -> None:
    a = np.zeros((8, 8), np.int32)
    b = a.copy()
    b[2, 3], b[5, 6] = 4, 9
    assert edits.changed_window(a, a) is None and edits.changed_window(a, b) == (2, 3, 6, 7)
    np.testing.assert_array_equal(np.unique(edits.relabel_sequential(b)), [0, 1, 2])


def test_pack_roundtrip_and_safe_names() -> None:
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.testing.assert_array_equal(unpack(pack(arr)), arr)
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("C:\\x\\..\\a b?.tif") == "a_b_.tif"
    assert safe_filename("...") == "image"


def test_project_history_is_bounded_and_paths_confined(tmp_path: Path) -> None:
    p = Project(tmp_path / "p")
    rec = p.add_image("a.tif", np.zeros((16, 16), np.uint8), channel_axis=None, content=b"x")
    def set_pixel(old: np.ndarray, k: int) -> tuple[np.ndarray, int]:
        out = old.copy()
        out[k % 16, 3] = k + 1
        return out, k + 1

    for k in range(MAX_HISTORY + 5):
        p.edit(rec.id, "set", lambda old, k=k: set_pixel(old, k))
    assert p.history(rec.id) == (MAX_HISTORY, 0)
    res = p.edit(rec.id, "nothing", lambda old: (old.copy(), None))
    assert res.window is None and res.version == res.base_version  # no-op edits are not recorded
    with pytest.raises(ProjectError, match="leaves the project"):
        p.resolve("../outside.txt")
    with pytest.raises(ValueError, match="boom"):
        p.edit(rec.id, "bad", lambda old: (_ for _ in ()).throw(ValueError("boom")))
    assert p.labels(rec.id)[0] == MAX_HISTORY + 5  # the failed edit was rolled back
    with pytest.raises(ValueError, match="do not fit"):
        p.edit(rec.id, "bad shape", lambda old: (np.zeros((3, 3), np.int32), None))


def test_lru_cache_bounds() -> None:
    c = LRUCache(max_items=3, max_bytes=10, size_of=len)
    for k in "abc":
        c.put(k, "xx")
    c.get("a")
    c.put("d", "xx")  # evicts b (least recently used)
    assert c.get("b") is None and c.get("a") == "xx" and len(c) == 3
    c.put("e", "x" * 9)  # over the byte bound: keeps only the newest
    assert len(c) == 1 and c.bytes == 9
    with pytest.raises(ValueError):
        LRUCache(max_items=0, max_bytes=1, size_of=len)
