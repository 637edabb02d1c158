"""The model contract that inference, the predictor, the server and evaluation are written against.

:class:`~cellsam.models.cellsam.CellSAM` implements it; so can a test double or a wrapper (an exported
model, a remote one). ``SegmentationModel`` is what the automatic pipeline calls (``cellsam.segment``,
the Dask path, evaluation); ``PromptableModel`` adds what the interactive predictor and the server need.
Shapes are in docs/ARCHITECTURE.md ("Model contract"). :func:`check_model` is the one runtime check.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from cellsam.config import CellSAMConfig, FlipTest, InferenceConfig

__all__ = ["PromptableModel", "SegmentationModel", "check_model", "inference_defaults", "model_members",
           "model_tile_size"]


class SegmentationModel(Protocol):
    """Encode once, detect boxes, decode masks from prompts (the automatic pipeline's calls)."""

    @property
    def img_size(self) -> int:
        """S, the side of the square encoder input."""
        ...

    def preprocess(self, images: Tensor) -> Tensor:
        """(B,3,S,S) in [0, 1] -> normalised (B,3,S,S)."""
        ...

    def encode(self, images: Tensor) -> Any:
        """One encoder pass: ``EncoderOutput(trunk, embedding (B,D,h,w))``."""
        ...

    def detect(self, enc: Any, images: Tensor | None = None, *,
               flip_test: FlipTest | bool | None = None) -> dict[str, Any]:
        """The detector's raw outputs (only passed on to :meth:`postprocess_detections`); ``flip_test``: the
        dense CellFinder's flip test (one of :data:`~cellsam.config.FLIP_TESTS`; True is ``"mirrors"``, False
        ``"off"``), None the model's setting."""
        ...

    def postprocess_detections(self, outputs: dict[str, Any], *, box_threshold: float) -> list[dict[str, Tensor]]:
        """Per image ``{"scores": (N,), "boxes": (N,4) xyxy pixels of S}``, best first."""
        ...

    def decode(self, embedding: Tensor, *, boxes: Tensor | None = None, points: tuple[Tensor, Tensor] | None = None,
               mask_input: Tensor | None = None, multimask_output: bool = False,
               chunk_size: int | str | None = "auto") -> tuple[Tensor, Tensor]:
        """Low-res mask logits (N,M,4h,4w) and predicted IoUs (N,M) of N prompts on one (1,D,h,w) embedding."""
        ...


class PromptableModel(SegmentationModel, Protocol):
    """A :class:`SegmentationModel` that the interactive :class:`~cellsam.inference.predictor.Predictor`, the
    server and the prompt study drive: its config, pixel statistics, eval mode, low-res side and logit
    upscaling."""

    cfg: CellSAMConfig
    pixel_mean: Tensor
    pixel_std: Tensor
    training: bool

    def eval(self) -> Any:
        """Inference mode (no dropout, frozen batch-norm statistics)."""
        ...

    @property
    def low_res_size(self) -> int:
        """4h, the side of the decoder's low-resolution masks."""
        ...

    def upscale_logits(self, low_res: Tensor) -> Tensor:
        """(N,M,4h,4w) -> (N,M,S,S) bilinear."""
        ...


def model_members(protocol: type) -> tuple[str, ...]:
    """The attribute and method names ``protocol`` declares (its own and its protocol bases'), in order."""
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls is object or not getattr(cls, "_is_protocol", False) or cls.__module__ == "typing":
            continue
        for name in [*getattr(cls, "__annotations__", {}), *vars(cls)]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return tuple(names)


def check_model(model: object, protocol: type = SegmentationModel, *,
                message: str = "a CellSAM model is needed") -> None:
    """Raise ``TypeError("<message>; <type> lacks [<every member of protocol it lacks>]")`` if any is missing."""
    missing = [name for name in model_members(protocol) if not hasattr(model, name)]
    if missing:
        raise TypeError(f"{message}; {type(model).__name__} lacks {missing}")


def inference_defaults(model: object) -> InferenceConfig:
    """The model's ``cfg.inference`` (its thresholds, refinement rounds, cell diameter); the paper's defaults
    for a model without one (a test double, a wrapper without a config)."""
    inference = getattr(getattr(model, "cfg", None), "inference", None)
    return inference if isinstance(inference, InferenceConfig) else InferenceConfig()


def model_tile_size(model: object) -> int:
    """The tile side in image pixels that one encoder input covers (``cfg.tile_size``; 512 without a config)."""
    return int(getattr(getattr(model, "cfg", None), "tile_size", 512))
