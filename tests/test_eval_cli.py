"""``cellsam evaluate``: --pred/--gt gives exactly evaluate_labels' numbers, clear errors for bad folders,
and --data runs models and baselines with tables, JSON and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from cellsam.cli import main
from cellsam.eval.folders import label_key
from cellsam.eval.metrics import evaluate_labels
from cellsam.models.build import build_model
from cellsam.weights import save_model
from tests.conftest import make_blobs
from tests.test_eval_harness import write_prepared


def _pairs(tmp_path: Path, n: int = 3) -> tuple[Path, Path, list[np.ndarray], list[np.ndarray]]:
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gts, preds = [], []
    for i in range(n):
        img, gt = make_blobs((64, 80), n=6, seed=i)
        pred = np.roll(gt, i, axis=0).astype(np.uint16)  # more shift, worse score
        pred[pred == 2] = 0  # one missed cell each
        Image.fromarray(gt.astype(np.uint16)).save(gt_dir / f"img{i}_masks.png")
        Image.fromarray((img * 255).astype(np.uint8)).save(gt_dir / f"img{i}_img.png")  # ignored: untagged
        tifffile.imwrite(pred_dir / f"img{i}_labels.tif", pred)  # cellsam segment's naming
        Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(pred_dir / f"img{i}_overlay.png")  # ignored
        gts.append(gt)
        preds.append(pred.astype(np.int32))
    return pred_dir, gt_dir, gts, preds


def test_label_key() -> None:
    assert label_key(Path("a_labels.tif")) == ("a", True)
    assert label_key(Path("a_cp_masks.png")) == ("a", True)
    assert label_key(Path("a.ome.tif")) == ("a", False)
    assert label_key(Path("x_masks.npy")) == ("x", True)


def test_pred_gt_gives_exactly_the_numbers_of_evaluate_labels(tmp_path: Path, capsys) -> None:
    pred_dir, gt_dir, gts, preds = _pairs(tmp_path)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--json", str(out),
                 "--plots", str(tmp_path / "plots")]) == 0
    got = json.loads(out.read_text())["methods"]["pred"]
    ref = evaluate_labels(gts, preds)
    ref_rows = ref.pop("per_image")
    for key, value in ref.items():
        if key == "coco":
            assert {k: got["overall"]["coco"][k] for k in value} == value
        else:
            assert got["overall"][key] == value, key
    assert [r["name"] for r in got["per_image"]] == ["img0", "img1", "img2"]
    assert [r["deepcell"]["f1"] for r in got["per_image"]] == [r["deepcell"]["f1"] for r in ref_rows]
    assert got["overall"]["deepcell"]["f1"] < 1.0
    text = capsys.readouterr().out
    assert "F1>.6 DC" in text and f"{ref['deepcell']['f1']:.3f}" in text
    assert (tmp_path / "plots" / "worst_pred.png").is_file() and (tmp_path / "plots" / "f1_by_data_type.png").is_file()


def test_pred_gt_errors_are_clear(tmp_path: Path, capsys) -> None:
    pred_dir, gt_dir, _, _ = _pairs(tmp_path)
    (pred_dir / "img1_labels.tif").unlink()
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir)]) == 2
    err = capsys.readouterr().err
    assert "1 ground-truth file(s) have no prediction" in err and "img1_masks.png" in err
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--missing-as-empty"]) == 0
    tifffile.imwrite(pred_dir / "img1_labels.tif", np.zeros((10, 10), np.uint16))
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir)]) == 2
    assert "img1: prediction" in capsys.readouterr().err
    tifffile.imwrite(pred_dir / "img1_labels.tif", np.full((64, 80), 0.5, np.float32))
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir)]) == 2
    assert "not a label image" in capsys.readouterr().err
    np.save(pred_dir / "img0_masks.npy", np.zeros((64, 80), np.int32))
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir)]) == 2
    assert "both pair as 'img0'" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred_dir)]) == 2
    assert "--pred and --gt go together" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(tmp_path / "nope"), "--gt", str(gt_dir)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["evaluate"]) == 2


def test_data_with_model_baseline_and_prompt_study(tmp_path: Path, capsys) -> None:
    root = write_prepared(tmp_path / "p", n_val=2)
    torch.manual_seed(0)
    ckpt = save_model(build_model("vit_tiny"), tmp_path / "tiny", version="test")
    out = tmp_path / "r.json"
    args = ["evaluate", "--data", str(root), "--model", str(ckpt), "--baseline", "otsu", "--prompt-study",
            "--box-threshold", "0.0", "--iou-threshold=-1e9", "--json", str(out), "--plots",
            str(tmp_path / "plots"), "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    rep = json.loads(out.read_text())
    assert list(rep["methods"]) == ["cellsam", "prompt:box", "prompt:point", "otsu"]
    assert rep["methods"]["otsu"]["overall"]["deepcell"]["f1"] >= 0.9
    assert rep["settings"]["cellsam"]["box_threshold"] == 0.0 and rep["split"] == "val"
    assert set(rep["methods"]["cellsam"]["by_data_type"]) == {"nuclear", "bacteria"}
    assert "numpy" in rep["environment"]
    text = capsys.readouterr().out
    assert "== otsu: by source" in text and "blobsB" in text and "all methods, overall" in text
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["f1_by_data_type.png", "worst_cellsam.png", "worst_otsu.png", "worst_prompt_box.png",
                    "worst_prompt_point.png"]


def test_data_errors(tmp_path: Path, capsys) -> None:
    root = write_prepared(tmp_path / "p", n_val=1)
    assert main(["evaluate", "--data", str(root), "--model", "none"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(root), "--model", "none", "--baseline", "magic"]) == 2
    assert "unknown --baseline" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(root), "--model", "none", "--prompt-study", "--baseline", "otsu"]) == 2
    assert "needs a model" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(root), "--split", "test", "--model", "none", "--baseline", "otsu"]) == 2
    assert "split 'test' does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(root), "--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in capsys.readouterr().err


def test_data_sources_selects_images(tmp_path: Path, capsys) -> None:
    root = write_prepared(tmp_path / "p", n_val=5)  # sources alternate: blobsA x3, blobsB x2
    out = tmp_path / "r.json"
    base = ["evaluate", "--data", str(root), "--model", "none", "--baseline", "otsu", "--json", str(out),
            "--no-progress"]
    assert main([*base, "--sources", "blobsB"]) == 0
    rep = json.loads(out.read_text())
    assert [im["source"] for im in rep["images"]] == ["blobsB", "blobsB"]
    assert list(rep["methods"]["otsu"]["by_source"]) == ["blobsB"]
    assert main([*base, "--sources", "blobsA", "--limit", "2"]) == 0  # the limit counts selected images
    assert [im["source"] for im in json.loads(out.read_text())["images"]] == ["blobsA", "blobsA"]
    capsys.readouterr()
    assert main([*base, "--sources", "nope"]) == 2
    assert "unknown source(s) ['nope']" in capsys.readouterr().err
    pred_dir, gt_dir, _, _ = _pairs(tmp_path)
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--sources", "blobsA"]) == 2
    assert "--sources selects images of --data" in capsys.readouterr().err


def test_named_baselines_run_side_by_side(tmp_path: Path, capsys) -> None:
    """NAME=KIND[:ARG] names a baseline's method, so two of one kind run in one report; a repeated name is
    an error, not a silent overwrite."""
    root = write_prepared(tmp_path / "p", n_val=2)
    out = tmp_path / "r.json"
    base = ["evaluate", "--data", str(root), "--model", "none", "--json", str(out), "--no-progress"]
    assert main([*base, "--baseline", "otsu", "--baseline", "floor=otsu"]) == 0
    rep = json.loads(out.read_text())
    assert sorted(rep["methods"]) == ["floor", "otsu"]
    assert rep["arguments"]["sources"] == []  # recorded as JSON, not as the string "()"
    assert rep["methods"]["floor"]["overall"]["f1_mean"] == rep["methods"]["otsu"]["overall"]["f1_mean"]  # same method
    out.unlink()
    capsys.readouterr()
    assert main([*base, "--baseline", "otsu", "--baseline", "otsu"]) == 2
    assert "already evaluated" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--baseline", "x=magic"]) == 2
    assert "unknown --baseline 'x=magic'" in capsys.readouterr().err
