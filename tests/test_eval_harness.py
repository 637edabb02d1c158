"""Evaluation harness: loading prepared sets and folders, scoring methods per source / data type, COCO from
per-cell masks, reports and plots. ``write_prepared`` (a tiny prepared set) is shared with the other
evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cellsam.eval.coco import coco_metrics
from cellsam.eval.harness import (
    EvalItem,
    Prediction,
    _MaskStacks,
    cellsam_method,
    data_type,
    evaluate_methods,
    format_tables,
    load_data,
    load_folder,
    load_prepared,
    score_predictions,
    write_json,
)
from cellsam.eval.metrics import evaluate_labels
from cellsam.models.build import build_model
from cellsam.ops.masks import CellMask
from tests.conftest import make_blobs

OPEN = {"box_threshold": 0.0, "iou_threshold": -1e9}  # random weights: open the gates to get cells
SOURCES = (("blobsA", "mixed", "nuclear"), ("blobsB", "bacteria / phase", "whole-cell"))


def prepared_image(blob: np.ndarray) -> np.ndarray:
    """(H, W) blob image -> (3, H, W) prepared layout, blob in the blue channel."""
    x = np.zeros((3, *blob.shape), np.float32)
    x[2] = blob
    return x


def write_prepared(root: Path, *, n_val: int = 4, n_train: int = 4, size: tuple[int, int] = (80, 100),
                   tile: int = 64) -> Path:
    """A tiny prepared dataset: ``val`` with full images alternating between two sources, ``train`` tiles."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"format_version": 1, "sources": [{"name": s} for s, _, _ in
                                                                                    SOURCES]}))
    full = root / "val" / "full"
    full.mkdir(parents=True)
    entries = []
    for i in range(n_val):
        img, lab = make_blobs(size, n=8, radius=(4, 8), seed=10 + i)
        src, kind, target = SOURCES[i % 2]
        np.save(full / f"{i:05d}_image.npy", prepared_image(img))
        np.save(full / f"{i:05d}_labels.npy", lab)
        entries.append({"image": f"{src}/img{i}.png", "source": src, "kind": kind, "target": target,
                        "image_npy": f"val/full/{i:05d}_image.npy", "labels_npy": f"val/full/{i:05d}_labels.npy"})
    (root / "val" / "images.json").write_text(json.dumps(entries))
    (root / "train").mkdir()
    tiles = [make_blobs((tile, tile), n=5, radius=(4, 7), seed=100 + i) for i in range(n_train)]
    np.save(root / "train" / "images.npy", np.stack([prepared_image(t[0]) for t in tiles]))
    np.save(root / "train" / "labels.npy", np.stack([t[1][None] for t in tiles]).astype(np.int32))
    (root / "train" / "images.json").write_text(json.dumps([{"image": "t", "source": "blobsA"}]))
    return root


def perfect(image: np.ndarray, gt: np.ndarray) -> Prediction:
    return Prediction(gt.copy())


perfect.uses_truth = True  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_prepared(tmp_path_factory.mktemp("prep") / "p")


def test_data_type_mapping() -> None:
    assert data_type("H&E", "nuclear") == "H&E"
    assert data_type("cell culture / phase+nuclear", "whole-cell") == "cell culture"
    assert data_type("bacteria / phase", "whole-cell") == "bacteria"
    assert data_type("yeast", "whole-cell") == "yeast"
    assert data_type("nuclear / nuclear", "nuclear") == "nuclear"
    assert data_type("mixed", "nuclear") == "nuclear"
    assert data_type("multiplexed tissue / membrane", "whole-cell") == "tissue"
    assert data_type("organoid / brightfield", "whole-cell") == "organoid"
    assert data_type("", "unknown") == "unknown"


def test_load_prepared_items_and_errors(prepared: Path, tmp_path: Path) -> None:
    items = load_prepared(prepared, "val")
    assert [it.source for it in items] == ["blobsA", "blobsB", "blobsA", "blobsB"]
    assert [it.data_type for it in items] == ["nuclear", "bacteria", "nuclear", "bacteria"]
    image, labels = items[0].load()
    assert image.shape == (3, 80, 100) and image.dtype == np.float32 and labels.dtype == np.int32
    assert labels.max() == 8 and (image[:2] == 0).all()
    assert len(load_data(prepared, "val", limit=2)) == 2
    with pytest.raises(FileNotFoundError, match="split 'test' does not exist"):
        load_prepared(prepared, "test")
    with pytest.raises(ValueError, match="no full images"):
        load_prepared(prepared, "train")
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        load_prepared(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(tmp_path / "nowhere")


def test_perfect_and_empty_methods_per_group(prepared: Path) -> None:
    items = load_prepared(prepared, "val")
    empty = lambda image: Prediction(np.zeros(image.shape[1:], np.int32))  # noqa: E731
    rep = evaluate_methods(items, {"perfect": perfect, "empty": empty})
    good, bad = rep["methods"]["perfect"], rep["methods"]["empty"]
    assert good["overall"]["deepcell"]["f1"] == 1.0 and good["overall"]["f1_mean"] == 1.0
    assert good["overall"]["coco"]["ap"] == pytest.approx(1.0) and good["overall"]["msa"] == 1.0
    assert bad["overall"]["deepcell"]["f1"] == 0.0 and bad["overall"]["coco"]["ap"] == 0.0
    assert set(good["by_source"]) == {"blobsA", "blobsB"} and set(good["by_data_type"]) == {"nuclear", "bacteria"}
    assert good["by_source"]["blobsA"]["n_images"] == 2 and good["overall"]["n_true"] == 32
    assert [r["source"] for r in good["per_image"]] == ["blobsA", "blobsB", "blobsA", "blobsB"]
    text = format_tables(rep)
    assert "blobsB" in text and "bacteria" in text and "all methods" in text


def test_group_numbers_equal_evaluate_labels_on_the_subset(prepared: Path) -> None:
    items = load_prepared(prepared, "val")

    def shifted(image: np.ndarray, gt: np.ndarray) -> Prediction:  # imperfect: masks moved by 1 px
        return Prediction(np.roll(gt, 1, axis=1))

    shifted.uses_truth = True  # type: ignore[attr-defined]
    res = evaluate_methods(items, {"m": shifted})["methods"]["m"]
    loaded = [it.load()[1] for it in items]
    sub = [0, 2]  # blobsA
    ref = evaluate_labels([loaded[i] for i in sub], [np.roll(loaded[i], 1, axis=1) for i in sub], per_image=False)
    got = res["by_source"]["blobsA"]
    for key in ("f1_mean", "ap50", "ap75", "msa", "aji", "aji_kumar"):
        assert got[key] == pytest.approx(ref[key])
    assert got["deepcell"]["f1"] == pytest.approx(ref["deepcell"]["f1"])
    assert got["coco"]["ap"] == pytest.approx(ref["coco"]["ap"])
    assert got["ap50"] == 1.0 > got["ap90"]  # the shift is visible at a strict threshold only


def test_coco_from_mask_crops_equals_explicit_stacks(rng: np.random.Generator) -> None:
    gt = np.zeros((40, 50), np.int32)
    gt[5:15, 5:15], gt[20:35, 10:30], gt[2:12, 30:45] = 1, 2, 3
    crops = [CellMask(5, 5, np.ones((10, 10), bool)), CellMask(18, 8, np.ones((14, 20), bool)),
             CellMask(6, 6, np.ones((12, 12), bool)), CellMask(0, 40, np.ones((5, 10), bool))]  # overlapping
    scores = np.array([0.9, 0.8, 0.95, 0.3])
    stacks = _MaskStacks([gt.shape], [crops])
    explicit = np.stack([c.to_full(gt.shape) for c in crops])
    assert (stacks[0] == explicit).all()
    got = score_predictions([gt], [Prediction(gt, crops, scores)])["coco"]
    ref = coco_metrics([gt], [explicit], [scores])
    assert got["ap"] == pytest.approx(ref["ap"]) and got["n_det"] == 4
    assert got["detections"].startswith("per-cell masks")
    # the scores matter: ranking the duplicate above the exact mask lowers AP vs the reverse
    rev = score_predictions([gt], [Prediction(gt, crops, np.array([0.95, 0.8, 0.9, 0.3]))])["coco"]
    assert rev["ap"] > got["ap"]


def test_tiny_cellsam_model_through_the_harness(prepared: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_model("vit_tiny").eval()
    items = load_prepared(prepared, "val", limit=2)
    kept = {}
    rep = evaluate_methods(items, {"cellsam": cellsam_method(net, **OPEN)},
                           keep=lambda m, it, gt, p: kept.setdefault(it.name, p))
    res = rep["methods"]["cellsam"]
    n_masks = sum(len(p.masks) for p in kept.values())
    assert n_masks > 0 and res["overall"]["coco"]["n_det"] == n_masks
    assert res["overall"]["coco"]["detections"].startswith("per-cell masks")
    assert [r["n_pred"] for r in res["per_image"]] == [int(p.labels.max()) for p in kept.values()]
    assert all(len(p.scores) == len(p.masks) for p in kept.values())
    assert res["overall"]["n_true"] == 16 and res["per_image"][0]["seconds"] > 0
    path = write_json(tmp_path / "r.json", rep)
    assert json.loads(path.read_text())["methods"]["cellsam"]["overall"]["n_images"] == 2


def test_load_folder_normalises_like_prepare(tmp_path: Path) -> None:
    from cellsam.data.synthetic import write_pairs

    write_pairs(tmp_path / "synth", n=3, size=64, seed=1)
    items = load_folder(tmp_path / "synth")
    assert len(items) == 3 and len(load_folder(tmp_path / "synth", limit=2)) == 2
    image, labels = items[0].load()
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1 and labels.max() > 0
    rep = evaluate_methods(items, {"perfect": perfect})
    assert rep["methods"]["perfect"]["overall"]["deepcell"]["f1"] == 1.0
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no annotated images"):
        load_folder(tmp_path / "empty")


def test_evaluate_methods_rejects_wrong_shapes_and_empty_input(prepared: Path) -> None:
    items = load_prepared(prepared, "val", limit=1)
    with pytest.raises(ValueError, match="has shape"):
        evaluate_methods(items, {"bad": lambda image: Prediction(np.zeros((3, 3), np.int32))})
    with pytest.raises(ValueError, match="no images"):
        evaluate_methods([], {"perfect": perfect})
    with pytest.raises(ValueError, match="no methods"):
        evaluate_methods(items, {})


def test_plots_write_pngs_with_outlines(prepared: Path, tmp_path: Path) -> None:
    from PIL import Image

    from cellsam.eval.plots import (
        Example,
        _overlay,
        f1_stats_by_data_type,
        plot_examples,
        plot_f1_by_data_type,
        worst_images,
    )

    items = load_prepared(prepared, "val")

    def half(image: np.ndarray, gt: np.ndarray) -> Prediction:  # misses the odd labels
        return Prediction(np.where(gt % 2 == 1, 0, gt))

    half.uses_truth = True  # type: ignore[attr-defined]
    rep = evaluate_methods(items, {"perfect": perfect, "half": half})
    stats = f1_stats_by_data_type(rep)
    assert stats["perfect"]["nuclear"] == (1.0, 0.0, 2) and stats["half"]["nuclear"][0] < 1.0
    p = plot_f1_by_data_type(rep, tmp_path / "f1.png")
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size[0] > 200 and np.asarray(im).std() > 0
    assert stats["half"]["nuclear"][0] == pytest.approx(np.mean([r["deepcell"]["f1"] for r in
                                                                 rep["methods"]["half"]["per_image"][::2]]))
    fake = {"methods": {"m": {"per_image": [{"deepcell": {"f1": f}, "n_true": 5} for f in (0.9, 0.2, 0.5)]}}}
    assert worst_images(fake, "m", 2) == [1, 2]
    image, gt = items[0].load()
    ex = Example(items[0].name, image, gt, np.roll(gt, 3, axis=0), 0.5)
    rgb = _overlay(ex)
    assert (np.all(rgb == (0.1, 0.9, 0.2), axis=-1)).any() and (np.all(rgb == (1.0, 0.2, 1.0), axis=-1)).any()
    q = plot_examples([ex, ex], tmp_path / "w.png")
    with Image.open(q) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="no examples"):
        plot_examples([], tmp_path / "x.png")


def test_eval_item_load_converts_types() -> None:
    it = EvalItem("n", "s", "nuclear", "mixed", lambda: (np.zeros((3, 4, 4), np.float64), np.ones((4, 4), np.uint16)))
    image, labels = it.load()
    assert image.dtype == np.float32 and labels.dtype == np.int32 and it.data_type == "nuclear"


def test_write_json_turns_non_finite_numbers_into_null(tmp_path: Path) -> None:
    out = write_json(tmp_path / "sub" / "r.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.loads(out.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2}}
