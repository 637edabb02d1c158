"""``cellsam benchmark``: one evaluation of the model, its prompt study and the baselines, written as a
markdown page with the commands; ``--merge`` of separate reports; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cellsam.cli import main
from cellsam.models.build import build_model
from cellsam.weights import save_model
from tests.test_eval_harness import write_prepared


def _tiny(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_model(build_model("vit_tiny"), tmp_path / "tiny", version="test")


def test_benchmark_runs_every_method_and_writes_the_page(tmp_path: Path) -> None:
    root = write_prepared(tmp_path / "p", n_val=3)
    notes = tmp_path / "notes.md"
    notes.write_text("Machine: a test box.")
    out = tmp_path / "bench" / "accuracy.md"
    assert main(["benchmark", "--data", str(root), "--model", str(_tiny(tmp_path)), "--out", str(out),
                 "--notes", str(notes), "--device", "cpu", "--no-progress"]) == 0
    rep = json.loads((out.parent / "accuracy_val.json").read_text())  # default JSON beside the page
    assert list(rep["methods"]) == ["cellsam", "prompt:box", "prompt:point", "otsu"]
    page = out.read_text()
    assert page.startswith(f"# Accuracy on the val split of {root} (3 images)")
    assert "Machine: a test box." in page and "Made by `cellsam benchmark --data" in page
    assert "--prompt-study" in page and "--baseline otsu" in page
    assert "== otsu: by source" in page and "== prompt:box: by source" in page
    otsu_f1 = rep["methods"]["otsu"]["overall"]["f1_mean"]
    assert f"{otsu_f1:.3f}" in page  # the tables hold the report's numbers


def test_benchmark_options_and_merge(tmp_path: Path, capsys) -> None:
    root = write_prepared(tmp_path / "p", n_val=2)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["benchmark", "--data", str(root), "--model", str(_tiny(tmp_path)), "--no-otsu",
                 "--no-prompt-study", "--json", str(a), "--out", str(tmp_path / "a.md"), "--device", "cpu",
                 "--no-progress"]) == 0
    assert list(json.loads(a.read_text())["methods"]) == ["cellsam"]
    assert main(["benchmark", "--data", str(root), "--model", "none", "--json", str(b),
                 "--out", str(tmp_path / "b.md"), "--no-progress"]) == 0
    assert list(json.loads(b.read_text())["methods"]) == ["otsu"]
    merged = tmp_path / "m.md"
    assert main(["benchmark", "--merge", str(a), str(b), "--out", str(merged), "--title", "Both"]) == 0
    page = merged.read_text()
    assert page.startswith("# Both") and "== cellsam: by source" in page and "== otsu: by source" in page
    assert f'Made by `cellsam benchmark --merge {a} {b} --out {merged} --title Both`' in page
    assert page.count("- `cellsam evaluate") == 2
    capsys.readouterr()
    # errors: the same method twice, different images, missing or corrupt reports, missing notes
    assert main(["benchmark", "--merge", str(b), str(b), "--out", str(merged)]) == 2
    assert "method 'otsu' is in two reports" in capsys.readouterr().err
    other = write_prepared(tmp_path / "q", n_val=3)
    c = tmp_path / "c.json"
    assert main(["benchmark", "--data", str(other), "--model", "none", "--json", str(c),
                 "--out", str(tmp_path / "c.md"), "--no-progress"]) == 0
    rep_c = json.loads(c.read_text())
    rep_c["methods"] = {"otsu2": rep_c["methods"]["otsu"]}
    c.write_text(json.dumps(rep_c))
    capsys.readouterr()
    assert main(["benchmark", "--merge", str(a), str(c), "--out", str(merged)]) == 2
    assert "different images" in capsys.readouterr().err
    assert main(["benchmark", "--merge", str(tmp_path / "nope.json"), "--out", str(merged)]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["benchmark", "--merge", str(tmp_path / "bad.json"), "--out", str(merged)]) == 2
    assert "not a JSON report" in capsys.readouterr().err
    assert main(["benchmark", "--merge", str(a), "--notes", str(tmp_path / "none.md"), "--out", str(merged)]) == 2
    assert "notes file" in capsys.readouterr().err
    assert main(["benchmark", "--data", str(tmp_path / "missing"), "--model", "none", "--out", str(merged)]) == 2
