"""An exponential moving average (EMA) of the weights during a training stage.

Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` keeps the average (PyTorch's
``AveragedModel`` with ``get_ema_avg_fn``), swaps it in for validation and copies it into the model when
the stage ends, so the exported model is the average. Batch-norm running statistics are averaged with the
weights (``use_buffers``). A stage asks for it with ``ema_decay`` > 0 (``TrainConfig``): the first update, after
step ``ema_start_step`` (counting from 0), copies the weights; every later step blends them in.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_avg_fn

__all__ = ["WeightEMA"]


class WeightEMA(WeightAveraging):
    """EMA of all parameters and buffers: ``avg = decay * avg + (1 - decay) * weights`` after every optimiser
    step from step ``start_step`` on (Lightning's global step)."""

    def __init__(self, decay: float, *, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        if start_step < 0:
            raise ValueError(f"ema_start_step must be >= 0, got {start_step}")
        super().__init__(avg_fn=get_ema_avg_fn(decay), use_buffers=True)
        self.decay, self.start_step = decay, start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step

    def __repr__(self) -> str:
        return f"WeightEMA(decay={self.decay}, start_step={self.start_step})"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("decay", self.decay) != self.decay:
            raise ValueError(f"this checkpoint averaged with ema_decay {state_dict['decay']}, the stage asks "
                             f"{self.decay}: resume with the same value")
        super().load_state_dict(state_dict)  # reads its own keys only
