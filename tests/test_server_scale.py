"""The web app's "Segment all" takes the same diameter option as cellsam.segment (issue #22)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from cellsam.models.build import build_model
from tests.test_server import blob_image, client_for, labels_of, tif_bytes, upload


def test_segment_all_takes_a_diameter(tmp_path: Path) -> None:
    from cellsam.inference.segment import segment

    torch.manual_seed(0)
    model = build_model("vit_tiny").eval()
    img, _ = blob_image()
    with client_for(tmp_path / "a", model) as client:
        image_id = upload(client, tif_bytes(img))["id"]
        r = client.post(f"/api/images/{image_id}/segment", json={"diameter": 20})
        assert r.status_code == 422 and "no cell diameter" in r.text  # vit_tiny has no size reference
        assert client.post(f"/api/images/{image_id}/segment", json={"diameter": -1}).status_code == 422
        assert client.post(f"/api/images/{image_id}/segment", json={"diameter": "big"}).status_code == 422
    model.cfg = model.cfg.replace(inference=dataclasses.replace(model.cfg.inference, cell_diameter=10.0))
    with client_for(tmp_path / "b", model) as client:
        image_id = upload(client, tif_bytes(img))["id"]
        body = {"box_threshold": 0.0, "iou_threshold": 0.0, "diameter": 20}
        r = client.post(f"/api/images/{image_id}/segment", json=body)
        assert r.status_code == 200, r.text
        expect = segment(img, model, box_threshold=0.0, iou_threshold=0.0, diameter=20.0)
        assert expect.tile_size == 2 * model.cfg.tile_size  # cells twice the model's size: tiles twice as large
        np.testing.assert_array_equal(labels_of(client, image_id)[1], expect.labels)
        native = segment(img, model, box_threshold=0.0, iou_threshold=0.0, diameter=None)
        assert not np.array_equal(native.labels, expect.labels)
