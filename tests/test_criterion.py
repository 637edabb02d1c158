"""SetCriterion (focal + L1 + GIoU), weights, the mask losses, and a tiny CellFinder overfit."""

from __future__ import annotations

import pytest
import torch

from cellsam.config import CellFinderConfig
from cellsam.models.cellfinder import CellFinder
from cellsam.train.criterion import SetCriterion, detection_weight_dict, total_loss
from cellsam.train.mask_loss import mask_iou, mask_losses
from cellsam.train.matcher import HungarianMatcher

Q, K = 12, 2
TGT_BOXES = torch.tensor([[0.2, 0.3, 0.1, 0.15], [0.7, 0.6, 0.2, 0.1], [0.5, 0.8, 0.12, 0.12]])
TGT_LABELS = torch.tensor([0, 1, 0])


def _criterion() -> SetCriterion:
    return SetCriterion(K, HungarianMatcher(), detection_weight_dict(num_decoder_layers=3))


def _perfect_outputs() -> dict[str, torch.Tensor]:
    logits = torch.full((1, Q, K), -12.0)
    boxes = torch.rand(1, Q, 4, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.3
    slots = torch.tensor([7, 2, 10])
    boxes[0, slots] = TGT_BOXES
    logits[0, slots, TGT_LABELS] = 12.0
    return {"pred_logits": logits, "pred_boxes": boxes}


def _targets() -> list[dict[str, torch.Tensor]]:
    return [{"labels": TGT_LABELS, "boxes": TGT_BOXES}]


def test_perfect_predictions_give_near_zero_loss_and_shuffled_do_not() -> None:
    crit = _criterion()
    perfect = crit(_perfect_outputs(), _targets())
    assert perfect["loss_ce"] < 1e-5 and perfect["loss_bbox"] < 1e-6 and perfect["loss_giou"] < 1e-6
    shuffled = _perfect_outputs()
    perm = torch.randperm(Q, generator=torch.Generator().manual_seed(1))
    shuffled["pred_boxes"] = shuffled["pred_boxes"][:, perm]
    bad = crit(shuffled, _targets())
    assert crit.total(bad) > 100 * crit.total(perfect) + 1.0


def test_aux_keys_and_weighting() -> None:
    out = _perfect_outputs()
    out["aux_outputs"] = [_perfect_outputs(), {k: v.clone() for k, v in _perfect_outputs().items()}]
    out["aux_outputs"][1]["pred_boxes"][0, 7] = torch.tensor([0.8, 0.1, 0.05, 0.05])
    losses = _criterion()(out, _targets())
    assert set(losses) == {f"{n}{s}" for n in ("loss_ce", "loss_bbox", "loss_giou") for s in ("", "_0", "_1")}
    assert losses["loss_bbox_1"] > 0.1 and losses["loss_bbox_0"] < 1e-6
    wd = detection_weight_dict(num_decoder_layers=3)
    assert wd["loss_bbox_1"] == 5.0 and wd["loss_ce"] == 2.0 and len(wd) == 9
    expected = sum(losses[k] * w for k, w in wd.items())
    torch.testing.assert_close(total_loss(losses, wd), expected)
    with pytest.raises(ValueError, match="no loss"):
        total_loss(losses, {"other": 1.0})


def test_normalised_by_number_of_boxes() -> None:
    crit = _criterion()
    out = _perfect_outputs()
    out["pred_boxes"][0, 7, 0] += 0.05  # an error on one box
    one = crit(out, _targets())
    two = crit({k: torch.cat([v, v]) for k, v in out.items()}, _targets() * 2)
    for k in one:  # twice the error over twice the boxes
        torch.testing.assert_close(one[k], two[k])
    torch.testing.assert_close(one["loss_bbox"], torch.tensor(0.05 / 3))


def test_empty_targets_and_focal_on_background() -> None:
    out = _perfect_outputs()
    out["pred_logits"].requires_grad_(True)
    out["pred_boxes"].requires_grad_(True)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = _criterion()(out, empty)
    assert losses["loss_bbox"] == 0 and losses["loss_giou"] == 0
    assert losses["loss_ce"] > 1.0  # three confident false positives, divided by max(num_boxes, 1)
    _criterion().total(losses).backward()
    assert out["pred_logits"].grad.abs().sum() > 0


def test_bad_targets_raise() -> None:
    with pytest.raises(ValueError, match="labels must be in"):
        _criterion()(_perfect_outputs(), [{"labels": torch.tensor([0, 2, 0]), "boxes": TGT_BOXES}])
    with pytest.raises(ValueError, match="targets"):
        _criterion()(_perfect_outputs(), _targets() * 2)


def test_mask_losses() -> None:
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(3, 1, 16, 16, generator=g) > 0.5).float()
    good = (target * 2 - 1) * 10  # confident and right
    bad = -good
    iou_good = mask_iou(good, target)
    torch.testing.assert_close(iou_good, torch.ones(3, 1))
    torch.testing.assert_close(mask_iou(bad, target), torch.zeros(3, 1))
    lg = mask_losses(good, target, torch.ones(3, 1))
    lb = mask_losses(bad, target, torch.ones(3, 1))
    assert lg["loss_mask_focal"] < 1e-4 and lg["loss_mask_dice"] < 1e-3 and lg["loss_iou"] < 1e-8
    assert lb["loss_mask_focal"] > 1.0 and lb["loss_mask_dice"] > 0.9
    torch.testing.assert_close(lb["loss_iou"], torch.tensor(1.0))  # predicted 1, actual 0
    # half-right masks: IoU of the binarised prediction is the regression target
    half = good.clone()
    half[:, :, :8] = -10.0
    actual = mask_iou(half, target)
    pred_iou = torch.full((3, 1), 0.5, requires_grad=True)
    out = mask_losses(half, target, pred_iou)
    torch.testing.assert_close(out["loss_iou"], ((0.5 - actual) ** 2).mean())
    out["loss_iou"].backward()
    assert pred_iou.grad.abs().sum() > 0


def test_mask_losses_empty_and_errors() -> None:
    logits = torch.zeros(0, 1, 8, 8, requires_grad=True)
    iou = torch.zeros(0, 1, requires_grad=True)
    out = mask_losses(logits, torch.zeros(0, 1, 8, 8), iou)
    assert all(v.item() == 0 and v.grad_fn is not None for v in out.values())
    sum(out.values()).backward()
    assert logits.grad is not None and iou.grad is not None
    with pytest.raises(ValueError, match="match"):
        mask_losses(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 4, 4), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="pred_iou"):
        mask_losses(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), torch.zeros(2))


def test_tiny_cellfinder_overfits_one_image() -> None:
    """~150 AdamW steps on fixed random features: the loss falls > 5x and the 3 cells are found."""
    torch.manual_seed(0)
    cfg = CellFinderConfig(d_model=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0,
                           num_query_position=16, spatial_prior="grid", num_classes=1)
    model = CellFinder(cfg, in_channels=16)
    feats = torch.randn(1, 16, 8, 8)
    targets = [{"labels": torch.zeros(3, dtype=torch.int64), "boxes": TGT_BOXES}]
    crit = SetCriterion(1, HungarianMatcher(), detection_weight_dict(num_decoder_layers=cfg.dec_layers))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    first = None
    for _ in range(150):
        loss = crit.total(crit(model(feats), targets))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(feats)
        final = crit.total(crit(out, targets)).item()
    assert final < first / 5, (first, final)
    (det,) = model.postprocess(out, image_size=100, box_threshold=0.5)
    assert len(det["scores"]) == 3
    centres = (det["boxes"][:, :2] + det["boxes"][:, 2:]) / 2 / 100
    dist = torch.cdist(centres, TGT_BOXES[:, :2]).min(dim=0).values
    assert (dist < 0.03).all(), dist
