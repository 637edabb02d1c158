"""Real-image bench scenes: the densest crop, the mosaic, and timing with the model's own CellFinder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellsam.bench.pipeline import time_pipeline
from cellsam.bench.real import real_scene
from cellsam.bench.suite import BenchSpec
from cellsam.models.build import build_model
from tests.conftest import make_blobs


def fake_dsb(folder: Path) -> Path:
    """Two grey fluorescence images (600x640 dense-ish, 300x300) and one RGB one that must be skipped."""
    folder.mkdir()
    for name, shape, n, seed in (("a", (600, 640), 60, 0), ("b", (300, 300), 8, 1), ("c", (300, 300), 8, 2)):
        img, lab = make_blobs(shape, n=n, radius=(6, 10), seed=seed)
        grey = (np.clip(img, 0, 1) * 200).astype(np.uint8)
        rgb = np.stack([grey] * 3, axis=-1)
        if name == "c":
            rgb[..., 0] = 255 - rgb[..., 0]  # colour: not a grey fluorescence image
        Image.fromarray(rgb).save(folder / f"{name}_img.png")
        Image.fromarray(lab.astype(np.uint16)).save(folder / f"{name}_masks.png")
    return folder


def test_dense_crop_is_the_densest_512_window(tmp_path: Path) -> None:
    folder = fake_dsb(tmp_path / "dsb")
    scene = real_scene("dense512", folder)
    assert scene.image.shape == (512, 512) and scene.image.dtype == np.uint16 and scene.name == "dense512"
    lab = scene.labels
    assert lab is not None and set(np.unique(lab)) == set(range(scene.n_cells + 1))  # renumbered 1..N
    full = np.asarray(Image.open(folder / "a_masks.png"))
    assert scene.n_cells <= len(np.unique(full)) - 1
    assert scene.n_cells > 0.5 * (len(np.unique(full)) - 1)  # most of image a's nuclei: it is the dense one


def test_mosaic_packs_the_grey_images_only(tmp_path: Path) -> None:
    folder = fake_dsb(tmp_path / "dsb")
    scene = real_scene("mosaic2048", folder)
    assert scene.image.shape == (2048, 2048)
    n = sum(len(np.unique(np.asarray(Image.open(folder / f"{k}_masks.png")))) - 1 for k in ("a", "b"))
    assert scene.n_cells == n  # images a and b, not the colour image c
    assert scene.boxes.shape == (n, 4)


def test_bad_real_scene_requests(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown real scene"):
        real_scene("huge", tmp_path)
    with pytest.raises(FileNotFoundError, match="DSB 2018 folder"):
        real_scene("dense512", tmp_path / "missing")
    with pytest.raises(ValueError, match="real-data"):
        BenchSpec(real=["dense512"]).validate()
    with pytest.raises(ValueError, match="real scenes must be among"):
        BenchSpec(real=["tiny"], real_data=str(tmp_path)).validate()


def test_time_pipeline_with_the_models_own_boxes(tmp_path: Path) -> None:
    scene = real_scene("dense512", fake_dsb(tmp_path / "dsb"))
    net = build_model("conv_tiny").eval()
    r = time_pipeline(net, scene, repeats=1, warmup=0, own_boxes=True, clip_masks=False)
    assert r["boxes"] == "model" and r["scene"] == "dense512" and r["n_cells"] == scene.n_cells
    assert r["end_to_end"]["median"] > 0 and r["stages"]["cellfinder"]["median"] > 0
    oracle = time_pipeline(net, scene, repeats=1, warmup=0, clip_masks=True)
    assert oracle["boxes"] == "scene" and oracle["boxes_decoded"] > 0


def test_time_pipeline_times_the_size_model_with_diameter_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--diameter auto on a real scene: the size model's pass is timed as the 'scale' stage, the
    estimate and the tile size used are recorded, and the window column names the diameter."""
    import math

    import torch

    import cellsam.inference.segment as segment_module

    # a random model's cells are random: keep auto at the size model's scale (the cells' second pass is
    # tested in test_scale.py)
    monkeypatch.setattr(segment_module, "rescale_from_cells", lambda labels, native, diameter, tile: (tile, None))

    from cellsam.bench.report import _window
    from cellsam.registry import get_config

    scene = real_scene("dense512", fake_dsb(tmp_path / "dsb"))
    net = build_model(get_config("conv_tiny").replace(size_head=True)).eval()
    assert net.size_head is not None
    f = net.size_head.weight.shape[0]
    net.size_head.set_fit(torch.zeros(f), torch.ones(f), torch.zeros(f), math.log(30.0))  # always 30 px
    import dataclasses

    net.cfg = net.cfg.replace(inference=dataclasses.replace(net.cfg.inference, cell_diameter=15.0))
    r = time_pipeline(net, scene, repeats=1, warmup=0, own_boxes=True, clip_masks=False, diameter="auto")
    assert r["stages"]["scale"]["median"] > 0
    assert r["diameter"] == "auto" and r["diameter_used"] == pytest.approx(30.0, rel=1e-4)
    assert r["tile_size_used"] == 2 * net.cfg.tile_size  # cells twice the model's size
    assert "d=auto (30 px)" in _window(r)
    plain = time_pipeline(net, scene, repeats=1, warmup=0, own_boxes=True, clip_masks=False)
    assert plain["stages"]["scale"]["median"] == 0 and plain["tile_size_used"] == net.cfg.tile_size
    with pytest.raises(ValueError, match="own boxes"):
        time_pipeline(net, scene, repeats=1, warmup=0, diameter="auto")


def test_cellpose_is_also_timed_at_the_cells_scale_beside_auto(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cellsam.bench import suite
    from cellsam.inference.scale import median_diameter

    folder = fake_dsb(tmp_path / "dsb")
    calls: list[float | None] = []

    def fake_cellpose(scene, path, spec, dev, notes, diameter=None):  # type: ignore[no-untyped-def]
        calls.append(diameter)
        return {"pipeline": "cellpose", "diameter": diameter}

    monkeypatch.setattr(suite, "_cellpose_run", fake_cellpose)
    monkeypatch.setattr(suite, "time_pipeline", lambda *a, **k: {"pipeline": "cellsam"})
    monkeypatch.setattr(suite, "_log_run", lambda r: None)
    models = {"m": (object(), {})}
    for diameters, want in (((None,), 1), ((None, "auto"), 2)):
        calls.clear()
        spec = BenchSpec(real=["dense512"], real_data=str(folder), diameters=list(diameters))
        suite._real_runs(spec, models, None, str(tmp_path), [], True)  # type: ignore[arg-type]
        assert len(calls) == want and calls[0] is None
    lab = real_scene("dense512", folder).labels
    assert lab is not None and calls[1] == pytest.approx(median_diameter(lab))  # the scene's true diameter
