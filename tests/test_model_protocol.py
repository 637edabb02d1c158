"""One model protocol: CellSAM satisfies it, and the runtime check names what a model lacks."""

from __future__ import annotations

import pytest
import torch

from cellsam.inference.predictor import Predictor
from cellsam.inference.runtime import resolve_model
from cellsam.models.build import build_model
from cellsam.models.protocol import PromptableModel, SegmentationModel, check_model, model_members


def test_members_are_the_pipeline_api_plus_the_interactive_one() -> None:
    pipeline = ("img_size", "preprocess", "encode", "detect", "postprocess_detections", "decode")
    assert model_members(SegmentationModel) == pipeline
    assert model_members(PromptableModel)[: len(pipeline)] == pipeline
    assert {"cfg", "pixel_mean", "pixel_std", "low_res_size", "upscale_logits", "eval"} <= set(
        model_members(PromptableModel))


@pytest.mark.parametrize("variant", ["vit_tiny", "conv_tiny"])
def test_cellsam_satisfies_both_protocols(variant: str) -> None:
    model = build_model(variant).eval()
    check_model(model, SegmentationModel)
    check_model(model, PromptableModel)
    typed: PromptableModel = model  # the static contract (a type checker verifies this line)
    assert typed is model


def test_runtime_checks_name_every_missing_member() -> None:
    with pytest.raises(TypeError, match=r"model name / checkpoint path; Linear lacks \['img_size'"):
        resolve_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"Predictor needs a CellSAM model; Linear lacks .*'upscale_logits'"):
        Predictor(torch.nn.Linear(2, 2))
