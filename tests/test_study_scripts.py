"""The study scripts' own logic (scripts/ is not a package: loaded by path)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _image(f1: float, ap: float, correct: int, n_true: int, n_pred: int) -> dict:
    return {"f1": {"0.50": f1}, "ap": {"0.50": ap},
            "deepcell": {"correct": correct, "n_true": n_true, "n_pred": n_pred}}


def test_summarise_pools_images_over_reports() -> None:
    zs = _load("zero_shot_study")
    a = {"methods": {"m": {"per_image": [_image(1.0, 0.5, 3, 4, 4)]}}}
    b = {"methods": {"m": {"per_image": [_image(0.0, 0.0, 0, 2, 0), _image(0.5, 0.25, 1, 2, 2)]}}}
    s = zs.summarise([a, b], "m")
    assert s["images"] == 3
    assert s["f1_50_mean"] == pytest.approx(0.5)
    assert s["ap50_mean"] == pytest.approx(0.25)
    assert s["deepcell_f1"] == pytest.approx(2 * 4 / (8 + 6))  # pooled, not a mean of per-image F1s


def test_cellpose_train_seconds_reads_the_models_record(tmp_path: Path) -> None:
    zs = _load("zero_shot_study")
    model = tmp_path / "models" / "cp_all"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    assert zs.cellpose_train_seconds(model) is None  # no record: unknown, not zero
    (tmp_path / "cp_all.json").write_text(json.dumps({"wall_seconds": 4428.3}))
    assert zs.cellpose_train_seconds(model) == 4428.3


@pytest.mark.parametrize("nimg", ["12", "48"])
def test_zero_shot_rejects_epochs_that_do_not_divide_the_steps(nimg: str, tmp_path: Path) -> None:
    # 12: not a multiple of the batch of 8; 48 does not divide 8 x 100 steps
    r = subprocess.run([sys.executable, str(SCRIPTS / "zero_shot_study.py"), "--tools", "cellpose",
                        "--cellpose-steps", "100", "--cellpose-nimg-per-epoch", nimg, "--runs", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--cellpose-nimg-per-epoch" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing trained or written


def test_false_positive_study_drops_cells_under_the_floor_exactly() -> None:
    fp = _load("false_positive_study")
    gt = np.zeros((40, 40), np.int32)
    gt[0:10, 0:10], gt[0:10, 20:30], gt[20:30, 0:10] = 1, 2, 3
    pred = gt.copy()
    pred[20:30, 0:10] = 0  # cell 3 missed
    pred[35:39, 35:39] = 7  # a 16 px speck on no cell
    pred[20:30, 20:24] = 8  # a 40 px false cell on no cell
    row = fp.image_row(gt, pred)
    assert row["n_gt"] == 3 and sorted(row["areas"]) == [16, 40, 100, 100]
    assert sum(row["matched"]) == 2 and sorted(row["on_gt"]) == [0.0, 0.0, 1.0, 1.0]
    assert fp.with_floor(row, 0.0) == (pytest.approx(2 * 2 / (3 + 4)), 0, 0)
    assert fp.with_floor(row, 0.2) == fp.with_floor(row, 0.0)  # floor 0.2 x 70 (median) = 14 < 16
    assert fp.with_floor(row, 0.3) == (pytest.approx(2 * 2 / (3 + 3)), 0, 1)  # 21 px: the speck goes
    assert fp.with_floor(row, 0.6) == (pytest.approx(2 * 2 / (3 + 2)), 0, 2)  # 42 px: both false cells go
    assert fp.with_floor(row, 0.99)[1] == 0 and fp.with_floor({**row, "matched": [True] * 4}, 0.6)[1] == 2
    s = fp.summary([row], [0.3])
    assert (s["true"], s["false_on_no_cell"], s["false_on_cells"]) == (2, 2, 0) and s["median_area_true"] == 100
    assert s["true_dropped"] == {"0.3": 0} and s["false_dropped"] == {"0.3": 1}
