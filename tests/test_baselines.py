"""Baselines: the Otsu + watershed floor separates good from bad; Cellpose 3 trains and predicts (skipped
where cellpose is not importable, see cellsam.eval.baselines.CELLPOSE_INSTALL)."""

from __future__ import annotations

import builtins
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cellsam.eval.baselines import load_training_tiles, otsu_method, otsu_watershed, require_cellpose
from cellsam.eval.harness import Prediction, evaluate_methods, load_prepared
from cellsam.eval.metrics import evaluate_labels
from tests.conftest import make_blobs
from tests.test_eval_harness import prepared_image, write_prepared

HAVE_CELLPOSE = importlib.util.find_spec("cellpose") is not None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_segments_synthetic_blobs_nearly_perfectly(seed: int) -> None:
    img, gt = make_blobs((128, 128), n=12, seed=seed)
    pred = otsu_watershed(prepared_image(img))
    res = evaluate_labels([gt], [pred], coco=False, per_image=False)
    assert pred.dtype == np.int32 and pred.shape == gt.shape
    assert res["deepcell"]["f1"] >= 0.95 and res["ap75"] >= 0.9


def test_otsu_splits_touching_disks_with_the_watershed() -> None:
    yy, xx = np.mgrid[:60, :80]
    gt = np.zeros((60, 80), np.int32)
    gt[(yy - 30) ** 2 + (xx - 28) ** 2 <= 100] = 1
    gt[((yy - 30) ** 2 + (xx - 47) ** 2 <= 100) & (gt == 0)] = 2  # overlapping disks, one blob of foreground
    pred = otsu_watershed(prepared_image((gt > 0).astype(np.float32)))
    assert ndimage.label(gt > 0)[1] == 1 and pred.max() == 2
    assert evaluate_labels([gt], [pred], coco=False, per_image=False)["deepcell"]["f1"] == 1.0


def test_otsu_inversion_for_dark_cells_on_a_bright_background() -> None:
    img, gt = make_blobs((96, 96), n=8, seed=4)
    dark = prepared_image(1.0 - img)  # bright-field-like
    f1 = lambda p: evaluate_labels([gt], [p], coco=False, per_image=False)["deepcell"]["f1"]  # noqa: E731
    assert f1(otsu_watershed(dark, invert=True)) >= 0.95 and f1(otsu_watershed(dark, invert="auto")) >= 0.95
    assert f1(otsu_watershed(dark)) < 0.2  # the default looks for bright objects
    with pytest.raises(ValueError, match="invert"):
        otsu_watershed(dark, invert="yes")


def test_otsu_on_empty_and_constant_images() -> None:
    for value in (0.0, 0.7):
        assert otsu_watershed(np.full((3, 40, 50), value, np.float32)).max() == 0
    with pytest.raises(ValueError, match="prepared image"):
        otsu_watershed(np.zeros((40, 50), np.float32))


def test_harness_tells_the_floor_from_noise(tmp_path: Path) -> None:
    items = load_prepared(write_prepared(tmp_path / "p"), "val")
    rng = np.random.default_rng(0)

    def noise(image: np.ndarray) -> Prediction:  # random rectangles: a bad method
        lab = np.zeros(image.shape[1:], np.int32)
        for k in range(1, 9):
            y, x = rng.integers(0, image.shape[1] - 10), rng.integers(0, image.shape[2] - 10)
            lab[y : y + 10, x : x + 10] = k
        return Prediction(lab)

    rep = evaluate_methods(items, {"otsu": otsu_method(), "noise": noise})
    good, bad = rep["methods"]["otsu"]["overall"], rep["methods"]["noise"]["overall"]
    assert good["deepcell"]["f1"] >= 0.9 and bad["deepcell"]["f1"] <= 0.2
    assert good["coco"]["ap50"] > 0.8 > bad["coco"]["ap50"] and good["seconds"] > 0


def test_training_tiles_subset(tmp_path: Path) -> None:
    root = write_prepared(tmp_path / "p", n_train=5)
    images, labels, index = load_training_tiles(root, max_tiles=3, seed=1)
    assert len(images) == len(labels) == 3 and len(set(index)) == 3 and index == sorted(index)
    assert images[0].shape == (3, 64, 64) and labels[0].shape == (64, 64) and labels[0].dtype == np.int32
    full = np.load(root / "train" / "labels.npy")
    assert all((labels[k] == full[i, 0]).all() for k, i in enumerate(index))
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_training_tiles(tmp_path)


def test_missing_cellpose_gives_install_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_cellpose(name, *args, **kwargs):
        if name == "cellpose" or name.startswith("cellpose."):
            raise ImportError("No module named 'cellpose'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cellpose)
    with pytest.raises(ImportError, match="pip install --no-deps --target"):
        require_cellpose()


def test_train_cellpose_rejects_bad_counts_before_any_work(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_cellpose_baseline.py"  # research, not installed
    spec = importlib.util.spec_from_file_location("train_cellpose_baseline", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train_cellpose = module.train_cellpose

    for kw in ({"epochs": 0}, {"epochs": 2, "nimg_per_epoch": 0}, {"epochs": 2, "save_every": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            train_cellpose(tmp_path / "missing", tmp_path / "out", **kw)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="to start from"):
        train_cellpose(tmp_path / "missing", tmp_path / "out", epochs=2, init=tmp_path / "nope")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~20 s: numba import + 2 tiny epochs
@pytest.mark.skipif(not HAVE_CELLPOSE, reason="cellpose 3 not importable (see CELLPOSE_INSTALL)")
def test_cellpose_trains_from_scratch_and_predicts(tmp_path: Path) -> None:
    from cellsam.eval.baselines import cellpose_method, cellpose_predict, train_cellpose

    root = write_prepared(tmp_path / "p", n_val=2, n_train=2)
    path = train_cellpose(root, tmp_path / "cp", epochs=3, batch_size=2, bsize=64, name="tiny", save_every=1)
    assert path.is_file()
    record = json.loads((tmp_path / "cp" / "tiny.json").read_text())
    assert record["tiles_used"] == 2 and record["recipe"]["optimizer"] == "SGD"
    assert record["recipe"]["weight_decay"] == 1e-4 and record["recipe"]["channels"] == [3, 2]
    assert record["cpu_seconds"] > 0 and record["wall_seconds"] > 0
    image, _ = load_prepared(root, "val")[0].load()
    labels = cellpose_predict(path, image)
    assert labels.shape == image.shape[1:] and labels.dtype == np.int32
    rep = evaluate_methods(load_prepared(root, "val"), {"cellpose": cellpose_method(path)})
    assert rep["methods"]["cellpose"]["overall"]["coco"]["detections"].startswith("label image")
    with pytest.raises(FileNotFoundError):
        cellpose_predict(tmp_path / "nope", image)
    # Fine-tuning starts from init's weights: at learning rate 0 they come out unchanged, while a
    # from-scratch run at lr 0 keeps its own random weights (batch-norm statistics still move: left out).
    import torch

    def weights(p: Path) -> dict[str, torch.Tensor]:
        return {k: v for k, v in torch.load(p, map_location="cpu", weights_only=True).items()
                if "diam" not in k and "running_" not in k and "num_batches" not in k}

    tuned = train_cellpose(root, tmp_path / "ft", epochs=1, batch_size=2, bsize=64, name="ft", init=path,
                           learning_rate=0.0)
    fresh = train_cellpose(root, tmp_path / "fresh", epochs=1, batch_size=2, bsize=64, name="fresh",
                           learning_rate=0.0, seed=1)
    w0, w1, w2 = weights(path), weights(tuned), weights(fresh)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert not all(torch.equal(w0[k], w2[k]) for k in w0)
    assert json.loads((tmp_path / "ft" / "ft.json").read_text())["init"] == str(path)


def test_cellpose_training_tiles_by_source(tmp_path: Path) -> None:
    from cellsam.eval.baselines import load_training_tiles

    root = write_prepared(tmp_path / "p", n_train=4)
    tiles = [{"source": s} for s in ("a", "b", "a", "b")]
    (root / "train" / "tiles.json").write_text(json.dumps(tiles))
    images, labels, index = load_training_tiles(root, sources=("b",))
    assert index == [1, 3] and len(images) == len(labels) == 2
    assert np.array_equal(images[1], np.load(root / "train" / "images.npy")[3])
    assert load_training_tiles(root, exclude_sources=("b",))[2] == [0, 2]
    assert load_training_tiles(root, sources=("a", "b"), max_tiles=3)[2] in ([0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="unknown source"):
        load_training_tiles(root, sources=("c",))
