"""The size model (Cellpose's SizeModel on our encoder): regression, the "size" stage, save/load, auto."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam.models.build import build_model
from cellsam.models.size_head import SizeHead
from cellsam.registry import get_config
from cellsam.train.config import TrainConfig
from cellsam.train.dataset import PreparedTiles
from cellsam.train.size import fit_ridge, size_samples
from tests.test_scale import disc_scene


def disc_dataset(root: Path, diameters: list[float], size: int = 128) -> Path:
    """A prepared training split of tiles of discs, one diameter per tile (brightness 1 on 0)."""
    d = root / "train"
    d.mkdir(parents=True)
    imgs, labs, tiles = [], [], []
    for i, diam in enumerate(diameters):
        lab = disc_scene(diam, n=9, size=size, seed=i)
        x = np.zeros((3, size, size), np.float32)
        x[2] = lab > 0
        imgs.append(x)
        labs.append(lab[None])
        tiles.append({"source": "discs", "image": f"t{i}", "y0": 0, "x0": 0})
    np.save(d / "images.npy", np.stack(imgs))
    np.save(d / "labels.npy", np.stack(labs))
    (d / "tiles.json").write_text(json.dumps(tiles))
    (root / "dataset.json").write_text("{}")
    return root


def test_fit_ridge_recovers_a_linear_law() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 2, 3, 4, 5]) + 7
    w = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.25])
    y = x @ w + 3.0
    fit = fit_ridge(x, y, ridge=1e-6)
    assert fit.rmse_log < 1e-3
    torch.testing.assert_close(fit.predict(x), y, atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        fit_ridge(x[:1], y[:1])


def test_size_head_predicts_and_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    from cellsam.weights import load_model, save_model

    cfg = get_config("conv_tiny").replace(size_head=True)
    model = build_model(cfg).eval()
    assert model.size_head is not None and not model.size_head.fitted
    with pytest.raises(ValueError, match="no fitted size model"):
        model.predict_diameter(torch.zeros(1, 3, 64, 64))
    f = model.size_head.weight.shape[0]
    model.size_head.set_fit(torch.zeros(f), torch.ones(f), torch.zeros(f), math.log(12.0))
    x = model.preprocess(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(model.predict_diameter(x), torch.full((2,), 12.0))
    path = save_model(model, tmp_path / "m", version="t")
    again = load_model(path)
    torch.testing.assert_close(again.predict_diameter(x), torch.full((2,), 12.0))
    with pytest.raises(ValueError, match="conv"):
        get_config("vit_tiny").replace(size_head=True)
    with pytest.raises(ValueError):
        SizeHead(4).set_fit(torch.zeros(4), torch.zeros(4), torch.zeros(4), 0.0)  # std must be > 0


def test_size_samples_target_the_diameter_at_the_crop_scale(tmp_path: Path) -> None:
    """Crops shown at scale s hold cells of s x their diameter: the targets are log(s d)."""
    data = disc_dataset(tmp_path, [10.0, 10.0])
    model = build_model("conv_tiny").eval()
    tiles = PreparedTiles(data, "train")
    x, y, native = size_samples(model, tiles, n=6, scale_range=(2.0, 2.0 + 1e-9), balance_power=0.0, seed=0,
                                batch_size=4)
    assert x.shape == (6, model.image_encoder.size_feature_chans) and y.shape == (6,)
    assert abs(native - 10.0) < 1.0
    assert torch.allclose(y.exp(), torch.full((6,), 20.0), atol=2.0)


def test_size_stage_learns_the_size_of_discs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A "size" stage on tiles of small and large discs: the fitted model predicts larger diameters for
    larger discs, stores the training diameter, and segment(diameter='auto') uses it."""
    import cellsam.inference.segment as segment_module

    # the untrained detector's cells are random: keep auto at the size model's scale (the cells' second
    # pass is tested in test_scale.py)
    monkeypatch.setattr(segment_module, "rescale_from_cells", lambda labels, native, diameter, tile: (tile, None))
    from cellsam.train.run import train
    from cellsam.weights import load_model, save_model

    data = disc_dataset(tmp_path / "data", [6.0, 8.0, 12.0, 16.0] * 2)
    start = save_model(build_model("conv_tiny"), tmp_path / "start", version="t")
    cfg = TrainConfig(stage="size", model="conv_tiny", init=str(start), data=str(data),
                      output=str(tmp_path / "size"), size_samples=160, size_scale_range=(0.5, 2.0),
                      size_ridge=10.0, balance_sources=False)
    path = train(cfg)
    model = load_model(path)
    summary = json.loads((tmp_path / "size" / "summary.json").read_text())
    assert model.cfg.size_head and model.cfg.inference.cell_diameter == pytest.approx(summary["cell_diameter"])
    assert 6.0 <= summary["cell_diameter"] <= 16.0
    small = disc_scene(5.0, n=16, size=64, seed=3) > 0
    large = disc_scene(20.0, n=4, size=64, seed=3) > 0
    x = torch.zeros(2, 3, 64, 64)
    x[0, 2], x[1, 2] = torch.from_numpy(small), torch.from_numpy(large)
    d = model.predict_diameter(model.preprocess(x))
    assert d[1] > 1.5 * d[0], d
    import cellsam

    seg = cellsam.segment(x[1].numpy(), model, channel_axis=0, normalize=False, diameter="auto")
    assert seg.diameter is not None and seg.diameter == pytest.approx(float(d[1]), rel=1e-3)
    model.cfg = model.cfg.replace(inference=dataclasses.replace(model.cfg.inference, cell_diameter=float(d[1])))
    again = cellsam.segment(x[1].numpy(), model, channel_axis=0, normalize=False, diameter="auto")
    assert again.tile_size == model.cfg.tile_size  # the estimate equals the model's size: no rescaling
