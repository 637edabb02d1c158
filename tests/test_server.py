"""``cellsam serve``: API tests with FastAPI's TestClient, a tiny random model and synthetic images."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import tifffile  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from cellsam.models.build import build_model  # noqa: E402
from cellsam.server.app import create_app  # noqa: E402
from cellsam.server.edits import relabel_sequential  # noqa: E402
from cellsam.server.images import Limits  # noqa: E402
from cellsam.server.schemas import decode_patch  # noqa: E402
from tests.conftest import make_blobs  # noqa: E402

SHAPE = (96, 80)  # two by two tiles of the tiny model's 64 px


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


def client_for(root: Path, model: torch.nn.Module, **kw: object) -> TestClient:
    return TestClient(create_app(root, model, model_name="tiny", finetune_accelerator="cpu", **kw))


def tif_bytes(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def blob_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    img, lab = make_blobs(SHAPE, n=6, radius=(6, 10), seed=seed)
    return (img * 4000).astype(np.uint16), lab


def upload(client: TestClient, content: bytes, name: str = "cells.tif", **data: object) -> dict:
    r = client.post("/api/images", files={"file": (name, content, "application/octet-stream")},
                    data={k: str(v) for k, v in data.items()})
    assert r.status_code == 201, r.text
    return r.json()


def labels_of(client: TestClient, image_id: int) -> tuple[int, np.ndarray]:
    r = client.get(f"/api/images/{image_id}/labels")
    assert r.status_code == 200
    h, w = int(r.headers["X-Height"]), int(r.headers["X-Width"])
    return int(r.headers["X-Labels-Version"]), np.frombuffer(r.content, "<u4").reshape(h, w).astype(np.int32)


def check_patch(client: TestClient, res: dict, before: np.ndarray) -> np.ndarray:
    """The edit's patch applied to ``before`` equals the labels the server now holds."""
    version, now = labels_of(client, res["image_id"])
    assert version == res["version"] == res["base_version"] + 1 and res["saved"] is True
    expect = before.copy()
    y0, x0, y1, x1 = res["window"]
    expect[y0:y1, x0:x1] = decode_patch(res["patch"], (y1 - y0, x1 - x0))
    np.testing.assert_array_equal(expect, now)
    assert res["n_cells"] == len(np.unique(now)) - 1
    return now


@pytest.fixture()
def client(tmp_path: Path, model: torch.nn.Module) -> TestClient:
    return client_for(tmp_path / "project", model)


@pytest.fixture()
def image_id(client: TestClient) -> int:
    return upload(client, tif_bytes(blob_image()[0]))["id"]


# ----------------------------------------------------------------------------------- uploads and pages
def test_upload_formats_and_display(client: TestClient) -> None:
    img, _ = blob_image()
    a = upload(client, tif_bytes(img), "a.tif")
    rgb = np.stack([(img >> 4).astype(np.uint8)] * 3, axis=-1)
    b = upload(client, png_bytes(rgb), "b.png")
    c = upload(client, png_bytes(rgb, "JPEG"), "c.jpg")
    two = upload(client, tif_bytes(np.stack([img, img[::-1]])), "two.tif", channel_axis=0)
    assert (a["height"], a["width"], a["n_channels"]) == (*SHAPE, 1)
    assert b["n_channels"] == 3 and c["n_channels"] == 3
    assert (two["n_channels"], two["nuclear"], two["wholecell"]) == (2, 0, 1)
    names = [im["name"] for im in client.get("/api/project").json()["images"]]
    assert names == ["a.tif", "b.png", "c.jpg", "two.tif"]
    r = client.get(f"/api/images/{a['id']}/display.png", params={"x0": 16, "y0": 32, "w": 50, "h": 100})
    assert r.headers["content-type"] == "image/png"
    assert np.asarray(Image.open(io.BytesIO(r.content))).shape == (SHAPE[0] - 32, 50, 3)
    # channel roles: swap them, then refuse an out-of-range channel
    r = client.patch(f"/api/images/{two['id']}", json={"nuclear": 1, "wholecell": None})
    assert r.status_code == 200 and (r.json()["nuclear"], r.json()["wholecell"]) == (1, None)
    r = client.patch(f"/api/images/{two['id']}", json={"nuclear": 5})
    assert r.status_code == 409 and "out of range" in r.json()["error"]


def test_bad_uploads_are_clear_4xx(tmp_path: Path, model: torch.nn.Module) -> None:
    client = client_for(tmp_path / "p", model, limits=Limits(max_bytes=200_000, max_pixels=50_000))

    def post(content: bytes, name: str = "x.png", **data: object):
        return client.post("/api/images", files={"file": (name, content)}, data={k: str(v) for k, v in data.items()})

    cases = [
        (post(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), 415, "not a readable PNG"),  # decoded before accepted
        (post(b"GIF89a" + b"\0" * 100, "x.gif"), 415, "only TIFF, PNG and JPEG"),
        (post(b"%PDF-1.4 hello", "cells.png"), 415, "unsupported file type"),  # the name does not matter
        (post(b""), 400, "empty"),
        (post(b"II*\x00" + bytes(300_000), "big.tif"), 413, "upload limit"),
        (post(tif_bytes(np.zeros((300, 300), np.uint8)), "huge.tif"), 413, "pixels"),
        (post(tif_bytes(np.zeros((3, 40, 40), np.uint8), photometric="minisblack", metadata=None), "c.tif"),
         422, "channel axis"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, r.text
        body = r.json()
        assert text in body["error"] and "Traceback" not in r.text
    assert client.get("/api/images").json() == []
    # the same 3-D TIFF with the channel axis given is accepted
    r = post(tif_bytes(np.zeros((3, 40, 40), np.uint8), photometric="minisblack", metadata=None), "c.tif",
             channel_axis=0)
    assert r.status_code == 201 and r.json()["n_channels"] == 3


def test_upload_names_cannot_escape_the_project(tmp_path: Path, model: torch.nn.Module) -> None:
    root = tmp_path / "deep" / "project"
    client = client_for(root, model)
    info = upload(client, tif_bytes(blob_image()[0]), "../../../evil.tif")
    stored = [p for p in tmp_path.rglob("*evil*")]
    assert len(stored) == 1 and stored[0].parent == root / "images"
    assert info["name"] == "../../../evil.tif"  # shown as given, stored safely
    assert client.get("/static/../cellsam_project.db").status_code == 404
    assert client.get("/api/images/1/display.png", params={"x0": -5}).status_code == 422


def test_errors_are_json(client: TestClient, image_id: int) -> None:
    r = client.get("/api/images/999")
    assert r.status_code == 404 and "no image with id 999" in r.json()["error"]
    r = client.post(f"/api/images/{image_id}/cells", json={"points": [[1, 2]], "point_labels": [1, 0]})
    assert r.status_code == 400 and "point_labels" in r.json()["error"]
    r = client.post(f"/api/images/{image_id}/paint", json={"points": "nope"})
    assert r.status_code == 422 and r.json()["error"].startswith("invalid request")
    r = client.post(f"/api/images/{image_id}/cells", json={"box": [0, 0, 10, 10], "cell": 77})
    assert r.status_code == 400 and "no cell 77" in r.json()["error"]
    r = client.post(f"/api/images/{2**70}/segment")  # beyond SQLite's integers: missing, not a crash
    assert r.status_code == 404 and "no image" in r.json()["error"]
    r = client.post("/api/images/1/nothing-here")  # FastAPI's own errors carry "error" too (the page reads it)
    assert r.status_code in (404, 405) and r.json()["error"]
    bad = np.full(SHAPE, -3, np.int32)
    r = client.post(f"/api/images/{image_id}/labels", files={"file": ("l.tif", tif_bytes(bad))})
    assert r.status_code in (400, 422) and r.json()["error"]  # the request's fault, not a conflict (409)


def test_boxes_past_the_edge_are_clipped_and_degenerate_ones_refused(client: TestClient, image_id: int) -> None:
    from cellsam.server.session import clip_box

    h, w = SHAPE
    assert clip_box((w - 20, 10, w + 30, 40), (h, w)) == (w - 20, 10, w, 40)
    assert clip_box((10, 10, 10, 40), (h, w)) is None and clip_box((50, 50, 10, 10), (h, w)) is None
    assert clip_box((w + 5, 0, w + 50, 9), (h, w)) is None and clip_box((0, 0, np.nan, 9), (h, w)) is None
    r = client.post(f"/api/images/{image_id}/cells", json={"box": [w - 30, 5, w + 40, 45]})  # dragged past the edge
    assert r.status_code == 200, r.text
    for box in ([100, 10, 100, 40], [60, 60, 20, 20], [w + 10, 0, w + 60, 20]):
        r = client.post(f"/api/images/{image_id}/cells", json={"box": box})
        assert r.status_code == 400 and "box" in r.json()["error"], box
    before = labels_of(client, image_id)[1].max()
    r = client.post(f"/api/images/{image_id}/decode", json={"boxes": [[w + 100, 0, w + 200, 50]], "replace": False})
    assert r.status_code == 200 and labels_of(client, image_id)[1].max() == before  # wholly outside: no cell


def test_a_click_beside_the_mask_found_is_no_cell(model: torch.nn.Module) -> None:
    """A click must lie in the mask it returns: a neighbour's mask is refused, not added as the clicked cell."""
    from cellsam.server.session import ModelSession

    session = ModelSession(model)
    image = np.zeros((3, 64, 64), np.float32)
    blob = np.full((64, 64), -8.0, np.float32)
    blob[10:20, 40:50] = 8.0  # the only cell the fake decoder ever returns

    class FakePredictor:
        def predict(self, **kw: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return blob[None], np.ones(1, np.float32), blob[None]

    session._predictor = lambda key, img, tl, i, size=None: FakePredictor()  # type: ignore[method-assign]
    got = session.predict("k", image, points=[(45.0, 15.0)], point_labels=[1])  # on the cell
    assert got.mask.sum() == 100
    with pytest.raises(ValueError, match="found no cell there"):
        session.predict("k", image, points=[(10.0, 50.0)], point_labels=[1])  # on background
    assert session.predict("k", image, box=(38, 8, 52, 22)).mask.sum() == 100  # a box decides by itself


def test_answers_carry_server_timing(client: TestClient, image_id: int) -> None:
    for r in (client.post(f"/api/images/{image_id}/cells", json={"box": [4, 4, 30, 30]}),
              client.get("/api/images/999"), client.get("/")):
        name, _, dur = r.headers["server-timing"].partition(";dur=")
        assert name == "app" and float(dur) > 0


def test_page_and_openapi(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "/static/app.js" in r.text and "Keyboard shortcuts" in r.text
    assert "function applyEdit" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/favicon.ico").status_code == 204
    # the interactive docs load their scripts from a CDN (blank offline): off; the schema stays
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/images", "/api/images/{image_id}/cells", "/api/images/{image_id}/undo", "/api/finetune",
              "/api/export/coco.json", "/api/images/{image_id}/paint", "/api/images/{image_id}/decode"):
        assert p in paths


def test_token_required_off_localhost(tmp_path: Path, model: torch.nn.Module) -> None:
    client = client_for(tmp_path / "p", model, token="s3cret")
    r = client.get("/api/project")
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert client.get("/api/project", headers={"X-CellSAM-Token": "wrong"}).status_code == 401
    assert client.get("/api/project", headers={"X-CellSAM-Token": "s3cret"}).status_code == 200
    assert client.get("/").status_code == 200  # the page itself is public, it holds no data
    assert client.get("/", params={"token": "s3cret"}).status_code == 200  # sets the cookie
    assert client.get("/api/project").status_code == 200


# ----------------------------------------------------------------------------------- edits
def test_every_edit_endpoint(client: TestClient, image_id: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # the random model's click masks need not hold the click; that rule has its own test
    monkeypatch.setattr("cellsam.server.session._holds_a_click", lambda mask, clicks: True)
    url = f"/api/images/{image_id}"
    _, labels = labels_of(client, image_id)
    # add by box, add by point (model prompts), refine with a negative point
    res = client.post(f"{url}/cells", json={"box": [20, 20, 44, 44]}).json()
    labels = check_patch(client, res, labels)
    first = res["cell"]
    assert res["action"] == "add cell (box)" and (labels == first).any()
    res = client.post(f"{url}/cells", json={"points": [[60, 70]], "point_labels": [1], "overwrite": True}).json()
    labels = check_patch(client, res, labels)
    assert res["cell"] == first + 1 and res["n_cells"] == 2
    ys, xs = np.nonzero(labels == first)
    res = client.post(f"{url}/cells", json={"points": [[float(xs[0]), float(ys[0])]], "point_labels": [0],
                                            "cell": first, "overwrite": True}).json()
    assert res["action"] == "refine cell" and res["cell"] == first
    if res["window"] is not None:
        labels = check_patch(client, res, labels)
    # paint two new cells, merge them, erase part of one, delete one
    res = client.post(f"{url}/paint", json={"points": [[5, 5], [12, 5]], "radius": 3, "overwrite": True}).json()
    labels = check_patch(client, res, labels)
    a = res["cell"]
    res = client.post(f"{url}/paint", json={"points": [[5, 90]], "radius": 3, "overwrite": True}).json()
    labels = check_patch(client, res, labels)
    b = res["cell"]
    assert b == a + 1 and (labels[89:92, 4:7] == b).all()
    res = client.post(f"{url}/paint", json={"points": [[5, 80]], "radius": 2, "cell": b}).json()
    labels = check_patch(client, res, labels)
    res = client.post(f"{url}/merge", json={"cells": [b, a]}).json()
    labels = check_patch(client, res, labels)
    assert res["cell"] == a and not (labels == b).any()
    res = client.post(f"{url}/paint", json={"points": [[5, 90]], "radius": 3, "erase": True, "cell": a}).json()
    labels = check_patch(client, res, labels)
    assert not (labels[89:92, 4:7] == a).any() and (labels[4:7, 4:12] == a).all()
    res = client.post(f"{url}/delete", json={"cells": [a]}).json()
    labels = check_patch(client, res, labels)
    assert not (labels == a).any()
    assert client.post(f"{url}/delete", json={"cells": [a]}).status_code == 400  # already gone
    assert client.post(f"{url}/merge", json={"cells": [first]}).status_code == 400  # needs two
    # decode accepted boxes (the box-review flow) without replacing the labels
    n = res["n_cells"]
    res = client.post(f"{url}/decode", json={"boxes": [[50, 10, 75, 35], [10, 60, 30, 90]], "replace": False}).json()
    labels = check_patch(client, res, labels)
    assert res["action"] == "add boxes" and res["n_cells"] > n
    res = client.post(f"{url}/decode", json={"boxes": [[50, 10, 75, 35]], "replace": True}).json()
    labels = check_patch(client, res, labels)
    assert res["n_cells"] == 1
    assert client.post(f"{url}/decode", json={"boxes": [[5, 5, 3, 9]]}).status_code == 400


def test_undo_redo(client: TestClient, image_id: int) -> None:
    url = f"/api/images/{image_id}"
    assert client.post(f"{url}/undo").status_code == 409
    states = [labels_of(client, image_id)[1]]
    for x in (10, 30, 50):
        client.post(f"{url}/paint", json={"points": [[x, 20]], "radius": 4})
        states.append(labels_of(client, image_id)[1])
    for k in (2, 1):
        res = client.post(f"{url}/undo").json()
        np.testing.assert_array_equal(labels_of(client, image_id)[1], states[k])
        assert res["can_redo"]
    res = client.post(f"{url}/redo").json()
    np.testing.assert_array_equal(labels_of(client, image_id)[1], states[2])
    assert res["can_redo"] and res["can_undo"] and res["action"] == "redo paint"
    client.post(f"{url}/delete", json={"cells": [1]})  # a new edit drops the redo stack
    assert client.post(f"{url}/redo").status_code == 409
    info = client.get(url).json()
    assert info["can_undo"] and not info["can_redo"]


def test_segment_all_matches_library(client: TestClient, image_id: int, model: torch.nn.Module) -> None:
    from cellsam.inference.segment import segment

    img, _ = blob_image()
    # the random model's box scores are ~0.01: threshold 0 keeps every query
    res = client.post(f"/api/images/{image_id}/segment", json={"box_threshold": 0.0, "iou_threshold": 0.0}).json()
    assert res["action"] == "segment all" and res["n_cells"] > 0
    expect = segment(img, model, box_threshold=0.0, iou_threshold=0.0).labels
    np.testing.assert_array_equal(labels_of(client, image_id)[1], expect)
    # the relative minimum area reaches the pipeline (0.9 x the median drops about half the cells)
    big = {"box_threshold": 0.0, "iou_threshold": 0.0, "min_area_rel": 0.9}
    assert client.post(f"/api/images/{image_id}/segment", json=big).json()["n_cells"] < res["n_cells"]
    np.testing.assert_array_equal(labels_of(client, image_id)[1],
                                  segment(img, model, box_threshold=0.0, iou_threshold=0.0, min_area_rel=0.9).labels)
    assert client.post(f"/api/images/{image_id}/segment", json={"min_area_rel": 1.5}).status_code == 422
    det = client.post(f"/api/images/{image_id}/detect", json={"box_threshold": 0.0}).json()
    assert 0 < len(det["boxes"]) == len(det["scores"]) and det["scores"] == sorted(det["scores"], reverse=True)
    for x0, y0, x1, y1 in det["boxes"]:
        assert 0 <= x0 < x1 <= SHAPE[1] and 0 <= y0 < y1 <= SHAPE[0]


def test_detect_route_with_the_dense_cellfinder(tmp_path: Path) -> None:
    """The shipped default's architecture (conv encoder + dense CellFinder) through ``POST /detect``."""
    torch.manual_seed(0)
    client = client_for(tmp_path / "p", build_model("conv_tiny").eval())
    image_id = upload(client, tif_bytes(blob_image()[0]))["id"]
    r = client.post(f"/api/images/{image_id}/detect", json={"box_threshold": 0.0})
    assert r.status_code == 200, r.text
    det = r.json()
    assert 0 < len(det["boxes"]) == len(det["scores"]) and det["scores"] == sorted(det["scores"], reverse=True)
    for x0, y0, x1, y1 in det["boxes"]:
        assert 0 <= x0 < x1 <= SHAPE[1] and 0 <= y0 < y1 <= SHAPE[0]


def test_embedding_cache_runs_encoder_once_per_tile(tmp_path: Path, model: torch.nn.Module) -> None:
    calls = []
    original = model.encode

    def counting(x: torch.Tensor):
        calls.append(tuple(x.shape))
        return original(x)

    model.encode = counting  # instance attribute: the Predictor calls self.model.encode
    try:
        client = client_for(tmp_path / "p", model)
        image_id = upload(client, tif_bytes(blob_image()[0]))["id"]
        url = f"/api/images/{image_id}"
        t0 = time.perf_counter()
        for k in range(6):  # all inside the top-left tile
            client.post(f"{url}/cells", json={"points": [[8 + 4 * k, 10]], "point_labels": [1], "overwrite": True})
            client.post(f"{url}/cells", json={"box": [4, 4, 20 + 4 * k, 24], "overwrite": True})
        elapsed = time.perf_counter() - t0
        assert len(calls) == 1, calls
        client.post(f"{url}/embed", json={"x": 75, "y": 90})  # the bottom-right tile: one more pass
        client.post(f"{url}/cells", json={"points": [[75, 90]], "point_labels": [1], "overwrite": True})
        assert len(calls) == 2
        client.patch(url, json={"reviewed": True})  # not a channel change: cache kept
        client.post(f"{url}/cells", json={"points": [[10, 10]], "point_labels": [1], "overwrite": True})
        assert len(calls) == 2 and elapsed < 30
    finally:
        del model.encode
    # a cache of one embedding alternates tiles -> re-encodes each time
    calls.clear()
    model.encode = counting
    try:
        client = client_for(tmp_path / "q", model, cache_items=1)
        image_id = upload(client, tif_bytes(blob_image()[0]))["id"]
        for xy in ([10, 10], [75, 90], [10, 10]):
            client.post(f"/api/images/{image_id}/embed", json={"x": xy[0], "y": xy[1]})
        assert len(calls) == 3
    finally:
        del model.encode


# ----------------------------------------------------------------------------------- persistence
def _edit_some(client: TestClient, image_id: int) -> None:
    url = f"/api/images/{image_id}"
    for x in (10, 40, 70):
        assert client.post(f"{url}/paint", json={"points": [[x, 30]], "radius": 5}).status_code == 200
    client.post(f"{url}/merge", json={"cells": [1, 2]})
    client.post(f"{url}/undo")
    client.patch(url, json={"reviewed": True, "nuclear": None})


def test_reopen_shows_the_same_state(tmp_path: Path, model: torch.nn.Module) -> None:
    root = tmp_path / "p"
    c1 = client_for(root, model)
    image_id = upload(c1, tif_bytes(blob_image()[0]))["id"]
    _edit_some(c1, image_id)
    info1, (v1, lab1) = c1.get(f"/api/images/{image_id}").json(), labels_of(c1, image_id)
    c1.app.state.ctx.project.close()
    c2 = client_for(root, model)
    assert c2.get(f"/api/images/{image_id}").json() == info1
    v2, lab2 = labels_of(c2, image_id)
    assert v2 == v1 and info1["n_cells"] == 3 and info1["can_redo"] and info1["reviewed"]
    np.testing.assert_array_equal(lab1, lab2)
    c2.post(f"/api/images/{image_id}/redo")  # the history survived too
    assert c2.get(f"/api/images/{image_id}").json()["n_cells"] == 2


def test_crash_safety_second_app_sees_every_confirmed_edit(tmp_path: Path, model: torch.nn.Module) -> None:
    root = tmp_path / "p"
    c1 = client_for(root, model)
    image_id = upload(c1, tif_bytes(blob_image()[0]))["id"]
    res = c1.post(f"/api/images/{image_id}/paint", json={"points": [[20, 20]], "radius": 6}).json()
    assert res["saved"]
    # c1 is never closed (as if the process were killed): a new app on the folder has the edit
    c2 = client_for(root, model)
    np.testing.assert_array_equal(labels_of(c2, image_id)[1], labels_of(c1, image_id)[1])
    # edits from both apps interleave without losing any
    c2.post(f"/api/images/{image_id}/paint", json={"points": [[60, 60]], "radius": 6})
    c1.post(f"/api/images/{image_id}/paint", json={"points": [[60, 20]], "radius": 6})
    for c in (c1, c2):
        v, lab = labels_of(c, image_id)
        assert v == 3 and len(np.unique(lab)) == 4
    assert (root / "cellsam_project.db-wal").exists() or (root / "cellsam_project.db").stat().st_size > 0


def test_concurrent_edits_of_one_image_lose_nothing(client: TestClient, image_id: int) -> None:
    n = 8
    errors: list[str] = []

    def worker(row: int) -> None:
        c = TestClient(client.app)
        for k in range(n):
            r = c.post(f"/api/images/{image_id}/paint", json={"points": [[5 + 9 * k, row]], "radius": 2})
            if r.status_code != 200:
                errors.append(r.text)

    threads = [threading.Thread(target=worker, args=(row,)) for row in (20, 70)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    v, lab = labels_of(client, image_id)
    assert v == 2 * n and len(np.unique(lab)) == 2 * n + 1


def test_folder_of_images_opens_as_project(tmp_path: Path, model: torch.nn.Module) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    img, lab = blob_image()
    tifffile.imwrite(folder / "a_img.tif", img)
    tifffile.imwrite(folder / "a_masks.tif", lab.astype(np.uint16))
    Image.fromarray((img >> 4).astype(np.uint8)).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    client = client_for(folder, model)
    images = client.get("/api/images").json()
    assert [im["name"] for im in images] == ["a_img.tif", "b.png"]
    np.testing.assert_array_equal(labels_of(client, images[0]["id"])[1], lab)
    assert images[1]["n_cells"] == 0 and not (folder / "images").exists()  # used in place


# ----------------------------------------------------------------------------------- exports
def test_exports_are_readable(client: TestClient, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    from cellsam.data.readers import read_pairs

    img, lab = blob_image()
    one = upload(client, tif_bytes(img), "one.tif")["id"]
    r = client.post(f"/api/images/{one}/labels", files={"file": ("l.tif", tif_bytes(lab.astype(np.uint16)))})
    assert r.status_code == 200 and r.json()["n_cells"] == lab.max()
    client.post(f"/api/images/{one}/delete", json={"cells": [2]})  # leaves a gap: exports renumber
    expect = relabel_sequential(labels_of(client, one)[1])
    two = upload(client, tif_bytes(np.stack([img, img // 2])), "two.tif", channel_axis=0)["id"]
    client.post(f"/api/images/{two}/labels", files={"file": ("l.png", png_bytes(lab.astype(np.uint16)))})

    tif = tifffile.imread(io.BytesIO(client.get(f"/api/images/{one}/export/labels.tif").content))
    np.testing.assert_array_equal(tif, expect)
    png = np.asarray(Image.open(io.BytesIO(client.get(f"/api/images/{one}/export/labels.png").content)))
    np.testing.assert_array_equal(png, expect)

    coco_path = tmp_path / "coco.json"
    coco_path.write_bytes(client.get("/api/export/coco.json").content)
    coco = COCO(str(coco_path))
    assert sorted(coco.getImgIds()) == [one, two]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[one]))
    assert len(anns) == expect.max()
    for a in anns:
        m = coco.annToMask(a).astype(bool)
        k = int(np.bincount(expect[m]).argmax())
        np.testing.assert_array_equal(m, expect == k)
        assert a["area"] == m.sum() and k > 0

    info = client.post("/api/export/pairs").json()
    folder = client.app.state.ctx.project.resolve(info["folder"])
    samples = {s.image_id: s for s in read_pairs(folder)}
    assert set(samples) == {"00001_one", "00002_two"}
    np.testing.assert_array_equal(samples["00001_one"].labels, expect)
    np.testing.assert_array_equal(samples["00001_one"].image[0], img)
    assert samples["00002_two"].roles == ("nuclear", "whole-cell")
    np.testing.assert_array_equal(samples["00002_two"].image, np.stack([img, img // 2]))
    z = zipfile.ZipFile(io.BytesIO(client.get("/api/export/pairs.zip").content))
    assert {Path(n).name for n in z.namelist()} >= {"00001_one_img.tif", "00001_one_masks.tif", "README.txt"}


# ----------------------------------------------------------------------------------- fine-tuning
def test_finetune_job_reports_before_after(tmp_path: Path) -> None:
    import dataclasses

    torch.manual_seed(1)
    model = build_model("vit_tiny").eval()  # a model with the hematoxylin rule: the fine-tuned one keeps it
    model.cfg = model.cfg.replace(inference=dataclasses.replace(model.cfg.inference, stain_grey="hematoxylin"))
    client = client_for(tmp_path / "p", model)
    assert client.post("/api/finetune", json={"mask_steps": 2}).status_code == 409  # nothing corrected yet
    img, lab = blob_image()
    image_id = upload(client, tif_bytes(img))["id"]
    client.post(f"/api/images/{image_id}/labels", files={"file": ("l.tif", tif_bytes(lab.astype(np.uint16)))})
    client.patch(f"/api/images/{image_id}", json={"reviewed": True})
    r = client.post("/api/finetune", json={"mask_steps": 2, "detection_steps": 1})
    assert r.status_code == 202, r.text
    assert client.post("/api/finetune", json={"mask_steps": 2}).status_code == 409  # one job at a time
    job = client.app.state.ctx.finetune.wait(timeout=300)
    info = client.get("/api/finetune").json()
    assert info["state"] == "done", info["message"]
    assert info["progress"] == 1.0 and info["images"] == 1 and info["tiles"] >= 1
    for key in ("before", "after"):
        assert 0.0 <= info[key]["f1"] <= 1.0 and info[key]["n_true"] == lab.max()
    # one corrected image: nothing could be held out, and the job says its scores are on that image
    assert info["held_out"] == [] and info["scored_on"] == "the training image"
    assert "only one corrected image" in info["warning"]
    assert info["worse"] == (info["after"]["f1"] < info["before"]["f1"])
    new_model = client.app.state.ctx.project.resolve(info["model"])
    record = json.loads(new_model.with_suffix(".json").read_text())
    assert new_model.is_file() and record["variant"] == "vit_tiny"
    assert record["config"]["inference"]["stain_grey"] == "hematoxylin"
    before = [p.detach().clone() for p in client.app.state.ctx.session.model.mask_decoder.parameters()]
    if info["worse"]:  # a worse model is only used when asked for explicitly
        assert client.post("/api/finetune/use").status_code == 409
    r = client.post("/api/finetune/use", json={"force": info["worse"]})
    assert r.json()["model"] == info["model"] == job.model and r.json()["warning"] == info["warning"]
    after = list(client.app.state.ctx.session.model.mask_decoder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # stage 2 changed the decoder
    assert client.get("/api/project").json()["model"] == info["model"]


def test_cli_serve_parser() -> None:
    from cellsam.cli import build_parser

    args = build_parser().parse_args(["serve", "some/folder", "--port", "9000", "--host", "0.0.0.0"])
    assert args.project == Path("some/folder") and args.port == 9000 and args.host == "0.0.0.0"
    assert args.func.__module__ == "cellsam.cli.serve" and args.model is None
    assert args.token is None and not args.no_token  # the command makes a token unless --no-token
    assert build_parser().parse_args(["serve", "--no-token"]).no_token
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--no-token", "--token", "x"])


def wait_for_address(proc: object, out: Path, timeout: float = 120) -> str:
    """The ``open http://...`` address a ``cellsam serve`` process printed into ``out``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in out.read_text().splitlines():
            if line.startswith("open http"):
                return line.split()[1]
        if proc.poll() is not None:  # type: ignore[attr-defined]
            pytest.fail(f"cellsam serve exited: {out.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"cellsam serve printed no address within {timeout} s: {out.read_text()}")


def test_kill_minus_9_loses_no_confirmed_edit(tmp_path: Path) -> None:
    """A real ``cellsam serve`` process killed with SIGKILL right after an edit was confirmed; it
    prints its address with a random token (as Jupyter), and refuses the API without it."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import httpx

    from cellsam.weights import save_model

    torch.manual_seed(0)
    ckpt = save_model(build_model("vit_tiny"), tmp_path / "tiny", version="test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "serve.out"
    with open(out, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "cellsam.cli", "serve", str(tmp_path / "p"), "--model",
                                 str(ckpt), "--port", str(port)], env=env, stdout=fh, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        url = wait_for_address(proc, out)
        assert url.startswith(f"{base}/?token=") and len(url.split("=", 1)[1]) >= 32
        api = httpx.Client(base_url=base, headers={"X-CellSAM-Token": url.split("=", 1)[1]}, timeout=30)
        for _ in range(240):
            try:
                api.get("/api/project", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert httpx.get(f"{base}/api/project").status_code == 401  # no token
        assert httpx.get(url).status_code == 200  # the printed address opens the page (and sets the cookie)
        r = api.post("/api/images", files={"file": ("a.tif", tif_bytes(blob_image()[0]))})
        image_id = r.json()["id"]
        res = api.post(f"/api/images/{image_id}/paint", json={"points": [[20, 20]], "radius": 6}).json()
        assert res["saved"]
        expect = np.frombuffer(api.get(f"/api/images/{image_id}/labels").content, "<u4").reshape(SHAPE)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    client = client_for(tmp_path / "p", build_model("vit_tiny").eval())
    v, labels = labels_of(client, image_id)
    assert v == res["version"] and (labels > 0).sum() > 50
    np.testing.assert_array_equal(labels, expect)


def test_detect_keeps_each_box_in_its_tiles_core_then_suppresses_overlaps(model: torch.nn.Module) -> None:
    """``ModelSession.detect`` uses the pipeline's ownership rule (``tile_cores`` / ``in_core``) and box NMS."""
    from cellsam.inference.tiling import tile_cores
    from cellsam.server.session import ModelSession

    session = ModelSession(model)
    image = np.zeros((3, 64, 100), np.float32)  # two tiles of 64 px along x: x0 = 0 and 36
    tiles = session.tiles((64, 100))
    assert [t.x0 for t in tiles] == [0, 36]
    cores = tile_cores(tiles, session.tile_size)
    split = cores[1][2]  # tile 1 owns box centres from here on (tile 0 up to a band further)
    # per tile, (N, 4) boxes in tile pixels and their scores
    reported = {
        0: (np.array([[30, 20, 40, 30], [30.5, 20, 40.5, 30], [split + 3, 5, split + 9, 11]], np.float32),
            np.array([0.9, 0.8, 0.7], np.float32)),
        1: (np.array([[30 - 36, 20, 40 - 36, 30], [60 - 36, 40, 70 - 36, 50]], np.float32),
            np.array([0.95, 0.6], np.float32)),
    }

    class FakePredictor:
        def __init__(self, i: int) -> None:
            self.i = i

        def detect(self, box_threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
            return reported[self.i]

    session._predictor = lambda key, img, tl, i, size=None: FakePredictor(i)  # type: ignore[method-assign]
    boxes, scores = session.detect("k", image, box_threshold=None)
    # tile 0's two near-identical boxes: the better one; its box centred in tile 1's core: dropped there;
    # tile 1's copy of the first cell (centre in tile 0's core): dropped; tile 1's own cell: kept
    np.testing.assert_array_equal(boxes, np.array([[30, 20, 40, 30], [60, 40, 70, 50]], np.float32))
    np.testing.assert_array_equal(scores, np.array([0.9, 0.6], np.float32))


def test_images_are_prepared_by_the_models_colour_rule(tmp_path: Path, model: torch.nn.Module) -> None:
    """A model trained on hematoxylin gets an H&E upload as its hematoxylin channel, in the routes as in
    ``cellsam.segment``; the cache keeps the two rules apart."""
    import copy
    import dataclasses

    from cellsam.inference.preprocess import prepare_image
    from cellsam.inference.segment import segment
    from tests.test_stain_grey import he_picture

    hed = copy.deepcopy(model)
    hed.cfg = hed.cfg.replace(inference=dataclasses.replace(hed.cfg.inference, stain_grey="hematoxylin"))
    rgb, _ = he_picture(SHAPE)
    client = client_for(tmp_path, hed)
    image_id = upload(client, png_bytes(rgb), name="he.png")["id"]
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    rec = ctx.record(image_id)
    np.testing.assert_allclose(ctx.prepared(rec), prepare_image(rgb, channel_axis=-1, stain="hematoxylin"), atol=1e-6)
    opts = {"box_threshold": 0.0, "iou_threshold": 0.0}
    client.post(f"/api/images/{image_id}/segment", json=opts)
    np.testing.assert_array_equal(labels_of(client, image_id)[1], segment(rgb, hed, channel_axis=-1, **opts).labels)
    ctx.session.model = model  # the luminance rule: prepared again, not read from the cache
    np.testing.assert_allclose(ctx.prepared(rec), prepare_image(rgb, channel_axis=-1), atol=1e-6)
