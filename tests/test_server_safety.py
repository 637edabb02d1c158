"""``cellsam serve`` safety (issue 19): cross-site requests and DNS rebinding, uploads that are not
images, exports that fail half-way, deleting images, and which images fine-tuning trains on."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import tifffile  # noqa: E402
import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from cellsam.models.build import build_model  # noqa: E402
from cellsam.server.access import Access, check_request, host_name, is_loopback  # noqa: E402
from cellsam.server.app import create_app  # noqa: E402
from tests.test_server import blob_image, client_for, labels_of, png_bytes, tif_bytes, upload  # noqa: E402

BASE = "http://127.0.0.1:8000"
FOREIGN = "http://evil.example"


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


@pytest.fixture()
def client(tmp_path: Path, model: torch.nn.Module) -> TestClient:
    return client_for(tmp_path / "project", model)


def local_client(root: Path, model: torch.nn.Module, token: str | None = None) -> TestClient:
    """An app with ``cellsam serve``'s rules for 127.0.0.1, reached as http://127.0.0.1:8000."""
    access = Access.for_bind("127.0.0.1", token=token)
    app = create_app(root, model, model_name="tiny", finetune_accelerator="cpu", token=access.token,
                     allowed_hosts=access.hosts)
    return TestClient(app, base_url=BASE)


def tif_upload(name: str = "cells.tif") -> dict:
    return {"file": (name, tif_bytes(blob_image()[0]), "image/tiff")}


# ----------------------------------------------------------------------------------- cross-site requests
def test_foreign_origin_cannot_change_the_project(tmp_path: Path, model: torch.nn.Module) -> None:
    client = client_for(tmp_path / "p", model)  # create_app's defaults: no token, any Host; origins checked
    own = "http://testserver"  # TestClient's address
    foreign = {"Origin": FOREIGN}
    r = client.post("/api/images", files=tif_upload(), headers=foreign)  # a multipart form: no CORS preflight
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    assert client.get("/api/images").json() == []  # reads from the page itself are fine

    image_id = upload(client, tif_bytes(blob_image()[0]))["id"]  # no Origin: curl / a script
    url = f"/api/images/{image_id}"
    assert client.post(f"{url}/paint", json={"points": [[20, 20]], "radius": 5},
                       headers={"Origin": own, "Sec-Fetch-Site": "same-origin"}).status_code == 200  # the page
    version, labels = labels_of(client, image_id)
    for method, path, kw in [
        ("POST", f"{url}/undo", {}),
        ("POST", f"{url}/paint", {"json": {"points": [[50, 50]], "radius": 5}}),
        ("PATCH", url, {"json": {"reviewed": True}}),
        ("DELETE", url, {}),
        ("POST", "/api/export/pairs", {}),
        ("POST", "/api/finetune", {"json": {"mask_steps": 1}}),
    ]:
        for headers in (foreign, {"Origin": "null"},  # sandboxed frames and file:// pages
                        {"Origin": "http://testserver:3000"},  # another port of this machine: another origin
                        {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
            r = client.request(method, path, headers=headers, **kw)
            assert r.status_code == 403, (method, path, headers, r.text)
            assert "refused" in r.json()["error"] and "Traceback" not in r.text
    now_version, now = labels_of(client, image_id)
    assert now_version == version and np.array_equal(now, labels)  # not undone, not painted
    info = client.get(url).json()
    assert not info["reviewed"] and info["can_undo"]
    assert not (tmp_path / "p" / "exports").exists()


def test_dns_rebinding_host_is_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    client = local_client(tmp_path / "p", model)
    # a foreign name that resolves to 127.0.0.1: the page's own requests are "same-origin" to it
    rebound = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000", "Sec-Fetch-Site": "same-origin"}
    for method, path in [("GET", "/"), ("GET", "/api/project"), ("GET", "/api/images"), ("POST", "/api/images"),
                         ("GET", "/openapi.json")]:
        kw = {"files": tif_upload()} if method == "POST" else {}
        r = client.request(method, path, headers=rebound, **kw)
        assert r.status_code == 403 and "Host 'evil.example:8000' is not allowed" in r.json()["error"], r.text
    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST:8000"):
        assert client.get("/api/project", headers={"Host": host}).status_code == 200, host
    assert client.get("/api/images").json() == []


def test_token_by_header_or_cookie_per_port(tmp_path: Path, model: torch.nn.Module) -> None:
    client = local_client(tmp_path / "p", model, token="s3cret")
    assert client.get("/api/project").status_code == 401
    assert client.post("/api/images", files=tif_upload()).status_code == 401
    assert client.get("/api/project", headers={"X-CellSAM-Token": "s3cret"}).status_code == 200
    r = client.get("/", params={"token": "s3cret"})
    assert r.status_code == 200 and "cellsam_token_8000=s3cret" in r.headers["set-cookie"]
    assert "samesite=strict" in r.headers["set-cookie"].lower() and "httponly" in r.headers["set-cookie"].lower()
    assert client.get("/api/project").status_code == 200  # the cookie
    # a cookie of the server on another port does not open this one
    other = TestClient(client.app, base_url=BASE, cookies={"cellsam_token_9000": "s3cret"})
    assert other.get("/api/project").status_code == 401
    # the token does not lift the origin check
    r = client.post("/api/images", files=tif_upload(), headers={"X-CellSAM-Token": "s3cret", "Origin": FOREIGN})
    assert r.status_code == 403


def test_access_rules() -> None:
    local = Access.for_bind("127.0.0.1", token=None)
    assert local.hosts == frozenset({"127.0.0.1", "localhost", "::1"}) and local.token is None
    with pytest.raises(ValueError, match="--no-token is only allowed with a loopback --host"):
        Access.for_bind("0.0.0.0", token=None)
    with pytest.raises(ValueError, match="needs an access token"):
        Access.for_bind("192.168.1.5", token=None)
    assert Access.for_bind("0.0.0.0", token="t").hosts is None  # any name; the token guards it
    lan = Access.for_bind("192.168.1.5", token="t", extra_hosts=["Lab-PC"])
    assert lan.hosts == frozenset({"192.168.1.5", "lab-pc", "127.0.0.1", "localhost", "::1"})
    assert Access.for_bind("::1", token=None).hosts is not None and is_loopback("127.0.0.2") and is_loopback("[::1]")
    assert not is_loopback("evil.example") and not is_loopback("10.0.0.1")
    assert [host_name(h) for h in ("LocalHost:80", "[::1]:8000", "[::1]", "a.b", "::1")] == \
        ["localhost", "::1", "::1", "a.b", "::1"]
    ok = {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}
    assert check_request(local, method="POST", path="/api/images", headers=ok, cookies={}, port=8000) is None
    assert check_request(local, method="GET", path="/", headers={"host": "x.test"}, cookies={}, port=8000).status == 403
    no_host = check_request(local, method="GET", path="/", headers={}, cookies={}, port=8000)
    assert no_host is not None and no_host.status == 403


def test_cli_refuses_no_token_beyond_loopback(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                              tmp_path: Path) -> None:
    from cellsam.cli import build_parser
    from cellsam.cli.serve import address, run

    args = build_parser().parse_args(["serve", str(tmp_path / "p"), "--host", "0.0.0.0", "--no-token"])
    assert run(args) == 2
    assert "--no-token is only allowed with a loopback --host" in caplog.text
    assert not (tmp_path / "p").exists()  # refused before anything was opened or loaded
    assert address("127.0.0.1", 8000, "abc") == "http://127.0.0.1:8000/?token=abc"
    assert address("::1", 8000, None) == "http://[::1]:8000/"


# ----------------------------------------------------------------------------------- uploads, exports, delete
def test_upload_is_stored_by_its_content_not_its_name(tmp_path: Path, model: torch.nn.Module) -> None:
    client = client_for(tmp_path / "p", model)
    img, _ = blob_image()
    rgb = np.stack([(img >> 4).astype(np.uint8)] * 3, axis=-1)
    cases = [("cells", tif_bytes(img), ".tif"), ("photo.tif", png_bytes(rgb), ".png"),
             ("scan.TIFF", tif_bytes(img), ".TIFF"), ("snap.jpeg", png_bytes(rgb, "JPEG"), ".jpeg")]
    root = client.app.state.ctx.project.root
    for name, content, suffix in cases:
        info = upload(client, content, name)
        assert info["name"] == name
        stored = client.app.state.ctx.project.image(info["id"]).file
        assert stored.endswith(suffix), stored
        assert (root / stored).is_file()
        r = client.get(f"/api/images/{info['id']}/display.png")
        assert r.status_code == 200, r.text
        assert client.post(f"/api/images/{info['id']}/paint", json={"points": [[9, 9]], "radius": 3}).status_code == 200
    r = client.post("/api/export/pairs")
    assert r.status_code == 200, r.text
    assert len([f for f in r.json()["files"] if f.endswith("_img.tif")]) == len(cases)


def test_images_stored_without_a_suffix_before_still_open(client: TestClient) -> None:
    """Projects where an upload was stored under its name alone (before uploads were renamed by content)."""
    project = client.app.state.ctx.project
    img, _ = blob_image()
    rec = project.add_image("legacy", img, channel_axis=None, content=tif_bytes(img))
    assert not Path(rec.file).suffix
    r = client.get(f"/api/images/{rec.id}/display.png")
    assert r.status_code == 200, r.text
    assert client.post("/api/export/pairs").status_code == 200


def test_non_images_are_refused_with_415(client: TestClient) -> None:
    for name, content in [("notes", b"just some text\n" * 20), ("x.tif", b"II*\x00" + b"\xff" * 64),
                          ("x.jpg", b"\xff\xd8\xff" + b"\x00" * 64), ("data.npy", b"\x93NUMPY\x01\x00" + bytes(64))]:
        r = client.post("/api/images", files={"file": (name, content)})
        assert r.status_code == 415, (name, r.text)
        assert "Traceback" not in r.text
    assert client.get("/api/images").json() == []


def test_a_failed_export_leaves_nothing_behind(tmp_path: Path, model: torch.nn.Module) -> None:
    client = client_for(tmp_path / "p", model)
    project = client.app.state.ctx.project
    good = upload(client, tif_bytes(blob_image()[0]), "good.tif")["id"]
    bad = upload(client, tif_bytes(blob_image(1)[0]), "bad.tif")["id"]
    project.resolve(project.image(bad).file).write_bytes(b"damaged on disk")  # e.g. a disk error
    client.app.state.ctx.session.forget(bad)
    answers = [client.post("/api/export/pairs"), client.get("/api/export/pairs.zip")]
    exports = project.root / "exports"
    assert not exports.exists() or list(exports.iterdir()) == []  # no half-written folder, no temporary one
    for r in answers:
        assert r.status_code == 400, r.text
        assert f"image {bad} (bad.tif) cannot be read" in r.json()["error"] and "delete it" in r.json()["error"]
    # delete the broken image from the project: both exports work again, complete
    assert client.delete(f"/api/images/{bad}").status_code == 204
    info = client.post("/api/export/pairs").json()
    assert info["folder"].startswith("exports/pairs-") and "00001_good_img.tif" in info["files"]
    info2 = client.post("/api/export/pairs").json()  # a second export in the same second gets its own folder
    assert info2["folder"] != info["folder"]
    assert sorted(p.name for p in exports.iterdir()) == sorted(Path(f).name for f in (info["folder"], info2["folder"]))
    z = zipfile.ZipFile(io.BytesIO(client.get("/api/export/pairs.zip").content))
    assert {Path(n).name for n in z.namelist()} == {"00001_good_img.tif", "00001_good_masks.tif", "README.txt"}
    assert len(list(exports.iterdir())) == 2  # the zip is built outside the project
    assert good == 1


def test_delete_an_image(tmp_path: Path, model: torch.nn.Module) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    tifffile.imwrite(folder / "in_place.tif", blob_image()[0])
    client = client_for(folder, model)
    (in_place,) = client.get("/api/images").json()
    uploaded = upload(client, tif_bytes(blob_image(1)[0]), "up.tif")
    stored = folder / client.app.state.ctx.project.image(uploaded["id"]).file
    client.post(f"/api/images/{uploaded['id']}/paint", json={"points": [[9, 9]], "radius": 3})
    assert client.delete(f"/api/images/{uploaded['id']}").status_code == 204
    assert not stored.exists() and [im["id"] for im in client.get("/api/images").json()] == [in_place["id"]]
    for r in (client.get(f"/api/images/{uploaded['id']}"), client.get(f"/api/images/{uploaded['id']}/labels"),
              client.delete(f"/api/images/{uploaded['id']}")):
        assert r.status_code == 404 and "no image with id" in r.json()["error"]
    assert client.delete(f"/api/images/{in_place['id']}").status_code == 204
    assert (folder / "in_place.tif").is_file()  # an image used in place is only forgotten, never deleted
    assert client.get("/api/images").json() == []
    assert client_for(folder, model).get("/api/images").json() == []  # and not imported again on reopen


# ----------------------------------------------------------------------------------- fine-tuning: what it trains on
def _labelled(client: TestClient, name: str, seed: int) -> int:
    img, lab = blob_image(seed)
    image_id = upload(client, tif_bytes(img), name)["id"]
    r = client.post(f"/api/images/{image_id}/labels", files={"file": ("l.tif", tif_bytes(lab.astype(np.uint16)))})
    assert r.status_code == 200 and r.json()["edited"] is False  # imported labels are not a person's edit
    return image_id


def test_finetune_uses_only_images_a_person_edited_or_reviewed(client: TestClient) -> None:
    image_id = upload(client, tif_bytes(blob_image()[0]))["id"]
    url = f"/api/images/{image_id}"
    res = client.post(f"{url}/segment", json={"box_threshold": 0.0, "iou_threshold": 0.0}).json()
    assert res["n_cells"] > 0
    r = client.post("/api/finetune", json={"mask_steps": 1})
    assert r.status_code == 409 and "Segment all" in r.json()["error"]  # the model's output is no correction
    assert res["edited"] is False
    other = _labelled(client, "imported.tif", 1)
    assert client.post("/api/finetune", json={"mask_steps": 1}).status_code == 409
    res = client.post(f"{url}/paint", json={"points": [[5, 5]], "radius": 3}).json()
    assert res["edited"] is True and client.get(url).json()["edited"] is True
    res = client.post(f"{url}/undo").json()
    assert res["edited"] is False and client.get(url).json()["edited"] is False  # an undone edit is no edit
    from cellsam.server.finetune import corrected_images

    project = client.app.state.ctx.project
    assert corrected_images(project) == []
    client.post(f"{url}/delete", json={"cells": [1]})
    client.patch(f"/api/images/{other}", json={"reviewed": True})
    assert [r.id for r in corrected_images(project)] == [image_id, other]


def test_finetune_holds_out_images_and_warns_when_worse(tmp_path: Path, model: torch.nn.Module,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from cellsam.server import finetune

    calls: list[int] = []

    def fake_score(model: object, images: list[np.ndarray], gts: list[np.ndarray]) -> dict:
        calls.append(len(images))
        f1 = 0.993 if len(calls) == 1 else 0.911  # the figures: the new model is worse
        return {"f1": f1, "ap50": f1 - 0.1, "n_true": sum(int(g.max()) for g in gts), "n_pred": 1,
                "per_image_f1": [f1] * len(images)}

    monkeypatch.setattr(finetune, "score", fake_score)
    client = client_for(tmp_path / "p", model)
    ids = [_labelled(client, f"im{k}.tif", k) for k in range(5)]
    for image_id in ids:
        client.patch(f"/api/images/{image_id}", json={"reviewed": True})
    train, held = finetune.split_holdout(client.app.state.ctx.project.images(), seed=0)
    assert len(held) == 1 and len(train) == 4 and not {r.id for r in held} & {r.id for r in train}
    assert client.post("/api/finetune", json={"mask_steps": 1}).status_code == 202
    client.app.state.ctx.finetune.wait(timeout=300)
    info = client.get("/api/finetune").json()
    assert info["state"] == "done", info["message"]
    assert info["images"] == 4 and info["held_out"] == [held[0].name] and calls == [1, 1]
    assert info["scored_on"].startswith("1 held-out image(s)") and held[0].name in info["scored_on"]
    assert info["worse"] is True and "scores worse than the current one" in info["warning"]
    assert "F1 0.911 vs 0.993" in info["warning"]
    model_before = client.app.state.ctx.session.name
    r = client.post("/api/finetune/use")
    assert r.status_code == 409 and "force=true" in r.json()["error"]
    assert client.app.state.ctx.session.name == model_before  # not switched
    r = client.post("/api/finetune/use", json={"force": True})
    assert r.status_code == 200 and r.json()["model"] == info["model"] and "worse" in r.json()["warning"]
    assert client.get("/api/project").json()["model"] == info["model"]


def test_split_holdout_sizes() -> None:
    from cellsam.server.finetune import compare, split_holdout
    from cellsam.server.records import ImageRecord

    recs = [ImageRecord(k, f"{k}", "", 8, 8, 1, None, None, None, True, n_cells=1) for k in range(11)]
    for n, held in [(1, 0), (2, 1), (4, 1), (8, 2), (11, 2)]:
        train, out = split_holdout(recs[:n], seed=3)
        assert (len(train), len(out)) == (n - held, held)
        assert split_holdout(recs[:n], seed=3) == (train, out)  # the seed decides
    assert compare({"f1": 0.5, "ap50": 0.4}, {"f1": 0.5, "ap50": 0.1}, scored_on="x") == (False, None)
    worse, note = compare({"f1": 0.5, "ap50": 0.4}, {"f1": 0.4, "ap50": 0.4}, scored_on="2 held-out image(s)")
    assert worse and "on 2 held-out image(s): F1 0.400 vs 0.500" in (note or "")


def test_page_controls_exist(client: TestClient) -> None:
    """The page's hooks for these features (the browser test clicks them where Chromium is present)."""
    html = client.get("/").text
    for element in ('id="btn-delete-image"', 'id="ft-warning"', 'id="ft-count"'):
        assert element in html
    assert "[hidden] { display: none !important; }" in client.get("/static/style.css").text
