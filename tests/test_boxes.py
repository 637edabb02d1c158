"""Box conversions, IoU/GIoU against torchvision, masks_to_boxes convention, clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.ops as tvo

from cellsam.ops.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    clip_boxes,
    generalized_box_iou,
    masks_to_boxes,
)
from tests.conftest import make_blobs


def _random_xyxy(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 30 + 0.5
    return torch.cat((xy, xy + wh), dim=1)


def test_round_trips() -> None:
    b = _random_xyxy(20, 0)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(b)), b)
    c = box_xyxy_to_cxcywh(b)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(c)), c)
    torch.testing.assert_close(c[:, 2:], b[:, 2:] - b[:, :2])
    torch.testing.assert_close(box_area(b), c[:, 2] * c[:, 3])
    # works on any leading shape
    assert box_cxcywh_to_xyxy(c.view(4, 5, 4)).shape == (4, 5, 4)


def test_iou_and_giou_match_torchvision() -> None:
    a, b = _random_xyxy(13, 1), _random_xyxy(7, 2)
    torch.testing.assert_close(box_iou(a, b), tvo.box_iou(a, b))
    torch.testing.assert_close(generalized_box_iou(a, b), tvo.generalized_box_iou(a, b))
    g = generalized_box_iou(a, a)
    torch.testing.assert_close(torch.diag(g), torch.ones(13))
    assert (g >= -1).all() and (g <= 1).all()


def test_giou_known_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 0.0, 3.0, 2.0], [4.0, 0.0, 6.0, 2.0]])
    # half overlap: IoU 2/6; disjoint boxes 2 apart: IoU 0, hull 12, union 8 -> -1/3
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 3, 0.0]]))
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor([[1 / 3, -1 / 3]]))


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))


def test_masks_to_boxes_label_image_convention() -> None:
    labels = torch.zeros(10, 12, dtype=torch.int32)
    labels[2:5, 3:8] = 4  # rows 2..4, cols 3..7
    labels[7, 9] = 2  # one pixel
    boxes = masks_to_boxes(labels)
    # rows follow the sorted label ids (2, then 4); max edge is +1
    torch.testing.assert_close(boxes, torch.tensor([[9.0, 7.0, 10.0, 8.0], [3.0, 2.0, 8.0, 5.0]]))
    assert box_area(boxes)[0] == 1.0  # a 1-pixel object has area 1
    assert masks_to_boxes(np.zeros((4, 4), np.int64)).shape == (0, 4)


def test_masks_to_boxes_stack_matches_label_image_and_torchvision() -> None:
    _, labels = make_blobs((64, 80), n=6, seed=3)
    lab = torch.from_numpy(labels)
    ids = torch.unique(lab[lab > 0])
    stack = torch.stack([lab == i for i in ids])
    from_labels = masks_to_boxes(labels)
    from_stack = masks_to_boxes(stack)
    torch.testing.assert_close(from_labels, from_stack)
    torch.testing.assert_close(from_stack, tvo.masks_to_boxes(stack) + torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with_empty = masks_to_boxes(torch.cat([stack, torch.zeros(1, 64, 80, dtype=torch.bool)]))
    torch.testing.assert_close(with_empty[-1], torch.zeros(4))


def test_masks_to_boxes_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="label image"):
        masks_to_boxes(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="shape"):
        masks_to_boxes(torch.zeros(1, 2, 4, 4, dtype=torch.int64))


def test_clip_boxes() -> None:
    b = torch.tensor([[-3.0, 2.0, 15.0, 40.0]])
    torch.testing.assert_close(clip_boxes(b, size=10), torch.tensor([[0.0, 2.0, 10.0, 10.0]]))
    torch.testing.assert_close(clip_boxes(b, size=(30, 12)), torch.tensor([[0.0, 2.0, 12.0, 30.0]]))
    with pytest.raises(ValueError):
        clip_boxes(b, size=0)


def test_paired_giou_is_the_diagonal_bit_for_bit() -> None:
    from cellsam.ops.boxes import paired_generalized_box_iou

    g = torch.Generator().manual_seed(3)
    a = box_cxcywh_to_xyxy(torch.rand(50, 4, generator=g) * 0.5 + 0.1)
    b = box_cxcywh_to_xyxy(torch.rand(50, 4, generator=g) * 0.5 + 0.1)
    b[7] = a[7]  # identical pair: 1
    paired = paired_generalized_box_iou(a, b)
    assert torch.equal(paired, torch.diag(generalized_box_iou(a, b)))  # same rounding: reruns stay bit-exact
    assert paired[7] == 1.0 and (paired >= -1).all() and (paired <= 1).all()
    with pytest.raises(ValueError, match="equal shapes"):
        paired_generalized_box_iou(a, b[:3])
