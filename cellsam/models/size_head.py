"""Size model: the typical cell diameter of an image from the encoder's features (Cellpose's SizeModel).

A linear (ridge) regression from the conv encoder's global size features (Cellpose's style vector at every
stage and the stages' log activation levels, :meth:`~cellsam.models.conv_encoder.ConvEncoder.size_features`)
to the log of the median
cell diameter, in pixels of the model's input. It is fitted in closed form after the networks are trained
(:mod:`cellsam.train.size`), on training crops shown at many scales, and stored as buffers of the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SizeHead"]


class SizeHead(nn.Module):
    """``log d = weight . (features - mean) / std + bias``; unfitted (all zeros) until :meth:`set_fit`.

    Args:
        features: F, the length of the feature vector.
    """

    mean: Tensor  # (F,) buffers, registered in __init__
    std: Tensor
    weight: Tensor
    bias: Tensor  # ()

    def __init__(self, features: int) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.register_buffer("weight", torch.zeros(features))
        self.register_buffer("bias", torch.zeros(()))

    @property
    def fitted(self) -> bool:
        return bool(self.weight.abs().sum() > 0 or self.bias != 0)

    def set_fit(self, mean: Tensor, std: Tensor, weight: Tensor, bias: float) -> None:
        """Store a fitted regression (see :func:`cellsam.train.size.fit_ridge`)."""
        f = self.weight.shape[0]
        if mean.shape != (f,) or std.shape != (f,) or weight.shape != (f,) or not bool((std > 0).all()):
            raise ValueError(f"expected (F,) = ({f},) mean, std > 0 and weight")
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.weight.copy_(weight)
        self.bias.fill_(float(bias))

    def forward(self, style: Tensor) -> Tensor:
        """(B, F) feature vectors -> (B,) predicted log median cell diameter (pixels of the model input)."""
        if style.ndim != 2 or style.shape[1] != self.weight.shape[0]:
            raise ValueError(f"expected style (B, {self.weight.shape[0]}), got {tuple(style.shape)}")
        return ((style.float() - self.mean) / self.std) @ self.weight + self.bias
