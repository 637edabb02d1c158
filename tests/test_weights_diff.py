"""Tensor-by-tensor comparison of weight files (cellsam.weights_diff, ``cellsam models compare``)."""

from __future__ import annotations

import uuid

import pytest
import torch

from cellsam.cli import main
from cellsam.models.build import build_model
from cellsam.weights import save_model, sha256_file
from cellsam.weights_diff import compare_state_dicts, compare_weights


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


def test_same_weights_other_metadata_are_identical_though_files_differ(tiny, tmp_path):
    a = save_model(tiny, tmp_path / "a", version="v0", metadata={"training_data": "run A"})
    b = save_model(tiny, tmp_path / "b", version="v1", metadata={"training_data": "run B"})
    assert sha256_file(a) != sha256_file(b)  # why a file hash is no reproduction check
    diff = compare_weights(a, b)
    assert diff.identical and diff.n_equal == diff.n_tensors == len(tiny.state_dict())
    assert diff.summary().startswith(f"bit-identical: all {diff.n_tensors} tensors")


def test_one_changed_value_is_found_with_its_size(tiny, tmp_path):
    a = save_model(tiny, tmp_path / "a", version="v0")
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    name = "mask_decoder.iou_token.weight"
    sd[name].view(-1)[3] += 1e-3
    other = build_model("vit_tiny")
    other.load_state_dict(sd)
    b = save_model(other, tmp_path / "b", version="v0")
    diff = compare_weights(a, b)
    assert not diff.identical and [d.name for d in diff.differ] == [name]
    assert diff.differ[0].n_differ == 1 and diff.differ[0].max_abs == pytest.approx(1e-3, rel=1e-3)
    assert diff.n_equal == diff.n_tensors - 1
    assert compare_weights(a, b, atol=2e-3).identical  # a tolerance counts it equal
    assert name in diff.summary()


def test_missing_reshaped_nan_and_integer_tensors():
    a = {"w": torch.ones(2, 2), "n": torch.tensor([float("nan"), 1.0]), "i": torch.tensor([1, 2]),
         "only_a": torch.zeros(1), "s": torch.zeros(3)}
    b = {"w": torch.ones(2, 2), "n": torch.tensor([float("nan"), 1.0]), "i": torch.tensor([1, 5]),
         "only_b": torch.zeros(1), "s": torch.zeros(4)}
    diff = compare_state_dicts(a, b)
    assert diff.only_a == ["only_a"] and diff.only_b == ["only_b"] and diff.mismatched == ["s"]
    assert [d.name for d in diff.differ] == ["i"] and diff.differ[0].max_abs == 3.0
    assert diff.n_equal == 2 and diff.n_tensors == 6  # NaNs in the same place are equal
    one_nan = compare_state_dicts({"x": torch.tensor([float("nan")])}, {"x": torch.tensor([0.0])})
    assert one_nan.differ[0].max_abs == float("inf")
    with pytest.raises(ValueError, match="atol"):
        compare_state_dicts(a, b, atol=-1)


def test_training_checkpoint_prefix_is_removed(tiny, tmp_path):
    a = save_model(tiny, tmp_path / "a", version="v0")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in tiny.state_dict().items()}}, ckpt)
    assert compare_weights(ckpt, a).identical


def test_cli_exit_codes(tiny, tmp_path, capsys):
    a = save_model(tiny, tmp_path / "a", version="v0")
    torch.manual_seed(1)
    b = save_model(build_model("vit_tiny"), tmp_path / "b", version="v0")
    assert main(["models", "compare", str(a), str(a)]) == 0
    assert "bit-identical" in capsys.readouterr().out
    assert main(["models", "compare", str(a), str(b), "--top", "2"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("NOT bit-identical") and "... and" in out
    assert main(["models", "compare", str(a), str(tmp_path / "missing.safetensors")]) == 2
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["models", "compare", str(a), str(tmp_path / "junk.pth")]) == 2
    (tmp_path / "w.txt").write_text("x")
    assert main(["models", "compare", str(a), str(tmp_path / "w.txt")]) == 2
    assert main(["models", "compare", str(a), str(a), "--atol", "-1"]) == 2
    assert main(["models", "compare", "no_such_weights", str(a)]) == 2


def test_registered_name_is_resolved(tiny, tmp_path, monkeypatch):
    from cellsam import registry
    from cellsam.registry import WeightsRecord

    monkeypatch.setenv("CELLSAM_HOME", str(tmp_path / "home"))
    src = save_model(tiny, tmp_path / "src", version="v0")
    rec = WeightsRecord(name=f"test_{uuid.uuid4().hex[:8]}.v0", variant="vit_tiny", url=src.as_uri(),
                        sha256=sha256_file(src), version="v0")
    registry.register_weights(rec)
    assert compare_weights(rec.name, src).identical
    with pytest.raises(KeyError, match="registered"):
        compare_weights("no_such_weights", src)
