"""The weight EMA of a training stage (cellsam.train.averaging): what it exports, when it starts, its checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from cellsam.train.averaging import WeightEMA
from cellsam.train.config import TrainConfig
from cellsam.train.run import train
from cellsam.weights import load_model
from tests.test_train import run_interrupted, tiny_cfg


class RawWeights(Callback):
    """The float weights and buffers after every optimiser step (before the EMA callback updates)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # type: ignore[no-untyped-def]
        self.steps.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()
                           if v.is_floating_point()})


def _expected(steps: list[dict[str, torch.Tensor]], decay: float, start: int) -> dict[str, torch.Tensor]:
    avg: dict[str, torch.Tensor] | None = None
    for w in steps[start:]:
        avg = dict(w) if avg is None else {k: decay * avg[k] + (1 - decay) * w[k] for k in w}
    assert avg is not None
    return avg


@pytest.mark.parametrize("start", [0, 2])
def test_stage_exports_the_ema_of_its_weights(tmp_path: Path, start: int) -> None:
    decay = 0.5
    cfg = tiny_cfg(tmp_path, max_steps=4, checkpoint_every_steps=0, val_max_tiles=0, ema_decay=decay,
                   ema_start_step=start)
    raw = RawWeights()
    path = train(cfg, callbacks=[raw])
    assert len(raw.steps) == 4
    got = load_model(path).state_dict()
    want = _expected(raw.steps, decay, start)
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=1e-6), name
    moved = [n for n in want if not torch.allclose(raw.steps[-1][n], raw.steps[-2][n])]
    assert moved and not all(torch.allclose(got[n], raw.steps[-1][n]) for n in moved)  # not the last weights


def test_without_ema_the_stage_exports_its_last_weights(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, max_steps=3, checkpoint_every_steps=0, val_max_tiles=0)
    raw = RawWeights()
    got = load_model(train(cfg, callbacks=[raw])).state_dict()
    assert all(torch.equal(got[n], v) for n, v in raw.steps[-1].items())


def test_ema_settings_are_checked() -> None:
    for bad in ({"ema_decay": 1.0}, {"ema_decay": -0.1}, {"ema_start_step": -1}):
        with pytest.raises(ValueError, match="ema_decay"):
            dataclasses.replace(TrainConfig(), **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA(0.0)
    ema = WeightEMA(0.9)
    with pytest.raises(ValueError, match="resume with the same value"):
        ema.load_state_dict({"latest_update_step": 3, "decay": 0.5})
    ema.load_state_dict({"latest_update_step": 3, "decay": 0.9})
    assert ema.state_dict()["latest_update_step"] == 3


def test_resume_with_ema_is_exact(tmp_path: Path) -> None:
    """2 steps + resume to 4 gives the same exported average and weights as 4 steps in one go."""
    straight = tiny_cfg(tmp_path, max_steps=4, checkpoint_every_steps=0, val_max_tiles=0, ema_decay=0.5,
                        output=str(tmp_path / "straight"))
    a = load_model(train(straight)).state_dict()
    b = load_model(run_interrupted(straight, tmp_path / "split", stop=2)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
