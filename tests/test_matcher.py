"""Hungarian matcher: batched == unbatched, empty targets, recovery of a known assignment."""

from __future__ import annotations

import pytest
import torch

from cellsam.train.matcher import HungarianMatcher


def _random_outputs(b: int, q: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(b, q, k, generator=g),
            "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.5 + 0.25}


def _random_targets(sizes: list[int], k: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, k, (m,), generator=g),
             "boxes": torch.rand(m, 4, generator=g) * 0.4 + 0.3} for m in sizes]


def test_batched_equals_unbatched_and_handles_empty_targets() -> None:
    matcher = HungarianMatcher()
    out = _random_outputs(3, 20, 2, 0)
    targets = _random_targets([5, 0, 9], 2, 1)
    batched = matcher(out, targets)
    assert len(batched) == 3
    for i, (src, tgt) in enumerate(batched):
        single = matcher({k: v[i : i + 1] for k, v in out.items()}, [targets[i]])[0]
        assert torch.equal(src, single[0]) and torch.equal(tgt, single[1])
        m = len(targets[i]["labels"])
        assert len(src) == len(tgt) == m
        assert src.dtype == tgt.dtype == torch.int64
        assert len(set(src.tolist())) == m and sorted(tgt.tolist()) == list(range(m))
    assert batched[1][0].numel() == 0


def test_recovers_a_known_permutation() -> None:
    torch.manual_seed(0)
    q, m = 30, 6
    tgt_boxes = torch.tensor([[0.1 + 0.15 * i, 0.2 + 0.1 * i, 0.05, 0.08] for i in range(m)])
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    slots = torch.randperm(q)[:m]  # query slots[j] predicts target j exactly
    boxes = torch.rand(1, q, 4) * 0.2 + 0.4
    logits = torch.full((1, q, 2), -3.0)
    boxes[0, slots] = tgt_boxes
    logits[0, slots, labels] = 3.0
    src, tgt = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes},
                                  [{"labels": labels, "boxes": tgt_boxes}])[0]
    assert dict(zip(tgt.tolist(), src.tolist(), strict=True)) == dict(enumerate(slots.tolist()))


def test_class_cost_decides_between_identical_boxes() -> None:
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    logits = torch.tensor([[[4.0, -4.0], [-4.0, 4.0]]])  # query 0 says class 0, query 1 class 1
    src, tgt = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes},
                                  [{"labels": torch.tensor([1]), "boxes": boxes[0, :1]}])[0]
    assert src.tolist() == [1] and tgt.tolist() == [0]


def test_more_targets_than_queries() -> None:
    out = _random_outputs(1, 4, 1, 2)
    src, tgt = HungarianMatcher()(out, _random_targets([7], 1, 3))[0]
    assert len(src) == len(tgt) == 4 and len(set(tgt.tolist())) == 4


def test_errors() -> None:
    out = _random_outputs(2, 5, 1, 0)
    with pytest.raises(ValueError, match="targets"):
        HungarianMatcher()(out, _random_targets([1], 1, 0))
    out["pred_boxes"][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        HungarianMatcher()(out, _random_targets([2, 2], 1, 0))
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)
