"""One-to-many anchor box losses: assignment rules, values, gradients, and wiring into training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cellsam.train.anchor_loss import anchor_assignment, anchor_box_losses
from cellsam.train.config import LossConfig
from cellsam.train.criterion import SetCriterion, detection_weight_dict
from cellsam.train.matcher import HungarianMatcher
from cellsam.train.module import CellSAMModule
from cellsam.train.run import initial_model
from tests.test_train import tiny_cfg

ANCHORS = torch.tensor([[0.1, 0.1], [0.3, 0.3], [0.32, 0.28], [0.9, 0.9], [0.62, 0.6]])


def test_assignment_smallest_containing_box_outside_and_nearest_for_empty_boxes() -> None:
    boxes = torch.tensor([
        [0.3, 0.3, 0.4, 0.4],    # big box holding anchors 1 and 2
        [0.31, 0.29, 0.05, 0.05],  # small box inside it, also holding anchors 1 and 2
        [0.5, 0.5, 0.02, 0.02],  # tiny box with no anchor inside: takes its nearest (4)
    ])
    a = anchor_assignment(ANCHORS, boxes)
    assert a.tolist() == [-1, 1, 1, -1, 2]
    assert anchor_assignment(ANCHORS, torch.zeros(0, 4)).tolist() == [-1] * 5


def test_assignment_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="anchors"):
        anchor_assignment(torch.zeros(5, 3), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="boxes"):
        anchor_assignment(ANCHORS, torch.zeros(1, 2))


def test_losses_zero_for_exact_boxes_and_gradient_only_on_assigned_queries() -> None:
    boxes = torch.tensor([[0.3, 0.3, 0.1, 0.1]])
    pred = torch.full((1, 5, 4), 0.5)
    pred[0, 1] = boxes[0]
    pred[0, 2] = boxes[0]
    exact = anchor_box_losses(pred, ANCHORS, [{"boxes": boxes}])
    assert exact["loss_anchor_bbox"] < 1e-7 and exact["loss_anchor_giou"] < 1e-6

    pred = torch.full((1, 5, 4), 0.5, requires_grad=True)
    out = anchor_box_losses(pred, ANCHORS, [{"boxes": boxes}])
    # two assigned queries, each off by (0.2, 0.2, 0.4, 0.4): mean L1 = 1.2
    assert out["loss_anchor_bbox"].item() == pytest.approx(1.2, abs=1e-6)
    assert out["loss_anchor_giou"] > 0.5
    given = anchor_box_losses(pred, ANCHORS, [{"boxes": boxes}], [anchor_assignment(ANCHORS, boxes)])
    assert all(torch.equal(given[k], out[k]) for k in out)  # a precomputed assignment gives the same losses
    with pytest.raises(ValueError, match="assignments"):
        anchor_box_losses(pred, ANCHORS, [{"boxes": boxes}], [])
    (out["loss_anchor_bbox"] + out["loss_anchor_giou"]).backward()
    moved = pred.grad.abs().sum(-1)[0]
    assert (moved[[1, 2]] > 0).all() and (moved[[0, 3, 4]] == 0).all()


def test_no_targets_give_zero_connected_losses() -> None:
    pred = torch.rand(2, 5, 4, requires_grad=True)
    out = anchor_box_losses(pred, ANCHORS, [{"boxes": torch.zeros(0, 4)}] * 2)
    assert out["loss_anchor_bbox"].item() == 0.0
    out["loss_anchor_giou"].backward()  # in the graph
    with pytest.raises(ValueError, match="targets"):
        anchor_box_losses(pred, ANCHORS, [{"boxes": torch.zeros(0, 4)}])


def test_criterion_adds_anchor_losses_per_layer_and_needs_anchors() -> None:
    weights = detection_weight_dict(num_decoder_layers=2)
    crit = SetCriterion(1, HungarianMatcher(), weights, anchor_losses=True)
    boxes = torch.rand(1, 5, 4) * 0.2 + 0.2
    outputs = {"pred_logits": torch.zeros(1, 5, 1), "pred_boxes": boxes, "anchors": ANCHORS,
               "aux_outputs": [{"pred_logits": torch.zeros(1, 5, 1), "pred_boxes": boxes}]}
    targets = [{"labels": torch.zeros(1, dtype=torch.long), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1]])}]
    losses = crit(outputs, targets)
    for k in ("loss_anchor_bbox", "loss_anchor_giou", "loss_anchor_bbox_0", "loss_anchor_giou_0"):
        assert k in losses
    assert torch.equal(losses["loss_anchor_bbox"], losses["loss_anchor_bbox_0"])  # same boxes both layers
    del outputs["anchors"]
    with pytest.raises(ValueError, match="anchors"):
        crit(outputs, targets)


def test_module_weights_and_trains_on_anchor_losses_only_when_configured(tmp_path: Path) -> None:
    base = tiny_cfg(tmp_path, stage="detection", max_steps=1, val_max_tiles=0)
    on = dataclasses.replace(base, loss=LossConfig(anchor_bbox=5.0, anchor_giou=2.0))
    from cellsam.train.dataset import PreparedTiles, collate

    batch = collate([PreparedTiles(base.data, "train")[i] for i in range(2)])
    totals = {}
    for name, cfg in (("off", base), ("on", on)):
        torch.manual_seed(0)
        module = CellSAMModule(initial_model(cfg), cfg)
        losses = module.compute_losses(*batch)
        assert ("loss_anchor_bbox" in losses) == (name == "on")
        assert ("loss_anchor_bbox" in module.criterion.weight_dict) == (name == "on")
        totals[name] = losses["loss"].item()
    assert totals["on"] > totals["off"]  # same model and batch: the extra terms are added
