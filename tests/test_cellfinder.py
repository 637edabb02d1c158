"""CellFinder (Anchor-DETR with RCDA): shapes, parameter layout, anchors, postprocess, gradients."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cellsam.config import CellFinderConfig
from cellsam.models.cellfinder import CellFinder
from cellsam.models.detr_transformer import grid_anchors
from cellsam.models.position_encoding import pos2posemb1d, pos2posemb2d

TINY = CellFinderConfig(
    d_model=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0,
    num_query_position=16, spatial_prior="grid",
)


def _check_outputs(out: dict, b: int, q: int, k: int, n_aux: int) -> None:
    assert out["pred_logits"].shape == (b, q, k)
    assert out["pred_boxes"].shape == (b, q, 4)
    assert len(out["aux_outputs"]) == n_aux
    for o in [out, *out["aux_outputs"]]:
        assert o["pred_logits"].shape == (b, q, k) and o["pred_boxes"].shape == (b, q, 4)
        assert torch.isfinite(o["pred_logits"]).all()
        assert (o["pred_boxes"] >= 0).all() and (o["pred_boxes"] <= 1).all()


def test_paper_config_shapes() -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(CellFinderConfig(), num_query_position=50)
    model = CellFinder(cfg, in_channels=768).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 768, 6, 8))  # non-square map exercises both RCDA branches' shapes
    _check_outputs(out, 2, 50, 2, 5)


@pytest.mark.parametrize("attention_type", ["RCDA", "nn.MultiheadAttention"])
@pytest.mark.parametrize("spatial_prior", ["grid", "learned"])
def test_tiny_config_shapes(attention_type: str, spatial_prior: str) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, attention_type=attention_type, spatial_prior=spatial_prior,
                              num_query_pattern=2)
    model = CellFinder(cfg, in_channels=24).eval()
    assert model.num_queries == 32
    with torch.no_grad():
        out = model(torch.randn(3, 24, 5, 7))
    _check_outputs(out, 3, 32, 2, 1)
    no_aux = CellFinder(dataclasses.replace(cfg, aux_loss=False), in_channels=24)
    assert "aux_outputs" not in no_aux(torch.randn(1, 24, 4, 4))


def test_paper_parameter_count_and_names() -> None:
    """Matches the measured official module: transformer 13,041,758, input_proj 197,376 (SPEC 2)."""
    model = CellFinder(CellFinderConfig(), in_channels=768)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model.transformer) == 13_041_758
    assert count(model.input_proj) == 197_376
    sd = model.state_dict()
    assert sd["transformer.encoder_layers.5.self_attn.in_proj_weight"].shape == (1280, 256)
    assert sd["transformer.decoder_layers.5.cross_attn.in_proj_weight"].shape == (1280, 256)
    assert sd["transformer.decoder_layers.0.self_attn.in_proj_weight"].shape == (768, 256)
    assert sd["transformer.position.weight"].shape == (3500, 2)
    assert sd["transformer.class_embed.weight"].shape == (2, 256)
    assert sd["transformer.bbox_embed.layers.2.weight"].shape == (4, 256)
    assert sd["input_proj.0.weight"].shape == (256, 768, 1, 1) and "input_proj.1.weight" in sd
    # 242 keys = the official 413 minus the 171 trunk keys minus 5 x 8 duplicated head keys
    assert len(sd) == 242 - 40


def test_initialisation_follows_anchor_detr() -> None:
    torch.manual_seed(0)
    model = CellFinder(dataclasses.replace(TINY, prior_prob=0.01), in_channels=8).eval()
    tr = model.transformer
    torch.testing.assert_close(tr.class_embed.bias, torch.full((2,), -math.log(99)))
    with torch.no_grad():
        out = model(torch.randn(1, 8, 4, 4))
    boxes = out["pred_boxes"][0]
    # the last box layer starts at zero: centres = anchors, sides = sigmoid(-2)
    torch.testing.assert_close(boxes[:, :2], tr.position.weight, atol=1e-4, rtol=0)
    torch.testing.assert_close(boxes[:, 2:], torch.full((16, 2), torch.sigmoid(torch.tensor(-2.0)).item()))
    learned = CellFinder(dataclasses.replace(TINY, spatial_prior="learned"), in_channels=8).transformer
    pos = learned.position.weight
    assert (pos >= 0).all() and (pos <= 1).all() and pos.std() > 0.1


def test_grid_anchors_lie_on_the_grid_and_learn() -> None:
    model = CellFinder(TINY, in_channels=8)
    pos = model.transformer.position.weight
    centres = torch.tensor([0.125, 0.375, 0.625, 0.875])
    expected = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1).reshape(-1, 2)
    torch.testing.assert_close(pos.detach(), expected)
    assert pos.requires_grad
    assert grid_anchors(9)[4].tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="square"):
        CellFinder(dataclasses.replace(TINY, num_query_position=15), in_channels=8)


def test_position_encodings() -> None:
    x = torch.tensor([0.0, 0.25])
    e1 = pos2posemb1d(x, num_pos_feats=8)
    assert e1.shape == (2, 8)
    torch.testing.assert_close(e1[:, 0], torch.sin(x * 2 * math.pi))
    torch.testing.assert_close(e1[:, 1], torch.cos(x * 2 * math.pi))
    e2 = pos2posemb2d(torch.tensor([[0.1, 0.7]]), num_pos_feats=8)
    # [y, x] order
    torch.testing.assert_close(e2[:, :8], pos2posemb1d(torch.tensor([0.7]), num_pos_feats=8))
    torch.testing.assert_close(e2[:, 8:], pos2posemb1d(torch.tensor([0.1]), num_pos_feats=8))


def test_batch_items_are_independent() -> None:
    torch.manual_seed(0)
    model = CellFinder(TINY, in_channels=8).eval()
    feats = torch.randn(2, 8, 4, 6)
    with torch.no_grad():
        both = model(feats)
        one = model(feats[1:])
    torch.testing.assert_close(both["pred_boxes"][1:], one["pred_boxes"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both["pred_logits"][1:], one["pred_logits"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both["pred_logits"][0], both["pred_logits"][1])


def test_postprocess_real_outputs() -> None:
    torch.manual_seed(0)
    model = CellFinder(TINY, in_channels=8).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 8, 4, 4))
    dets = model.postprocess(out, image_size=64, box_threshold=0.0)
    assert len(dets) == 2
    for d in dets:
        assert d["boxes"].shape == (16, 4) and d["scores"].shape == (16,) and d["labels"].shape == (16,)
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= 64).all()
        assert (d["boxes"][:, 2:] >= d["boxes"][:, :2]).all()
        assert (d["scores"] >= 0).all() and (d["scores"] <= 1).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        assert set(d["labels"].tolist()) <= {0, 1}


def test_postprocess_threshold_sort_and_clip() -> None:
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    logits = torch.tensor([[[logit(0.3), logit(0.1)], [logit(0.2), logit(0.9)], [logit(0.6), logit(0.5)]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.95, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]]])
    (d,) = CellFinder(TINY, in_channels=8).postprocess(
        {"pred_logits": logits, "pred_boxes": boxes}, image_size=100, box_threshold=0.4)
    torch.testing.assert_close(d["scores"], torch.tensor([0.9, 0.6]))
    assert d["labels"].tolist() == [1, 0]
    torch.testing.assert_close(d["boxes"], torch.tensor([[85.0, 30.0, 100.0, 70.0], [0.0, 0.0, 50.0, 50.0]]))


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    for attention_type in ("RCDA", "nn.MultiheadAttention"):
        model = CellFinder(dataclasses.replace(TINY, attention_type=attention_type), in_channels=8)
        # the last box layer is zero-initialised (no gradient behind it yet): perturb it first
        torch.nn.init.normal_(model.transformer.bbox_embed.layers[-1].weight, std=0.1)
        out = model(torch.randn(2, 8, 4, 5))
        loss = sum((o["pred_logits"].sum() + (o["pred_boxes"] * torch.randn_like(o["pred_boxes"])).sum())
                   for o in [out, *out["aux_outputs"]])
        loss.backward()
        for name, p in model.named_parameters():
            if attention_type != "RCDA" and "adapt_pos1d" in name:
                assert p.grad is None  # 1-D positions feed RCDA only (the module is kept, as in CellSAM)
                continue
            assert p.grad is not None, f"{attention_type}: no gradient for {name}"
            assert p.grad.abs().sum() > 0, f"{attention_type}: zero gradient for {name}"


def test_bad_input_raises() -> None:
    model = CellFinder(TINY, in_channels=8)
    with pytest.raises(ValueError, match="expected features"):
        model(torch.randn(1, 7, 4, 4))
    with pytest.raises(ValueError, match="expected features"):
        model(torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="attention_type"):
        CellFinder(dataclasses.replace(TINY, attention_type="bogus"), in_channels=8)
    with pytest.raises(TypeError):
        CellFinder({"d_model": 32}, in_channels=8)  # type: ignore[arg-type]


def test_pos_scale_sharpens_position_encodings() -> None:
    """With pos_scale = grid side, neighbouring anchors get clearly different position codes."""
    import torch.nn.functional as F

    a = torch.tensor([[0.50, 0.5], [0.50 + 1 / 24, 0.5]])
    broad = F.cosine_similarity(*pos2posemb2d(a, num_pos_feats=64), dim=0)
    sharp = F.cosine_similarity(*pos2posemb2d(a, num_pos_feats=64, scale=32.0), dim=0)
    assert broad > 0.99 and sharp < 0.9
    with pytest.raises(ValueError, match="pos_scale"):
        CellFinder(dataclasses.replace(TINY, pos_scale=0.0), in_channels=8)


def test_sample_at_reads_pixel_centres_and_interpolates() -> None:
    from cellsam.models.detr_transformer import sample_at

    mem = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).view(2, 4, 4, 3)  # (B, H, W, C)
    pts = torch.tensor([[0.125, 0.125], [0.875, 0.375], [0.25, 0.125]])  # (x, y): centres, then midway
    out = sample_at(mem, pts)
    assert out.shape == (2, 3, 3)
    assert torch.allclose(out[:, 0], mem[:, 0, 0]) and torch.allclose(out[:, 1], mem[:, 1, 3])
    assert torch.allclose(out[:, 2], (mem[:, 0, 0] + mem[:, 0, 1]) / 2)


def test_query_content_features_makes_queries_see_their_anchor() -> None:
    """'features' adds no parameters (checkpoints load either way) and a change of the features at
    one anchor changes that query's first-layer input; 'pattern' queries start identical."""
    torch.manual_seed(0)
    pat = CellFinder(TINY, in_channels=8).eval()
    feat = CellFinder(dataclasses.replace(TINY, query_content="features"), in_channels=8).eval()
    feat.load_state_dict(pat.state_dict(), strict=True)
    seen: dict[str, torch.Tensor] = {}
    for name, m in (("feat", feat), ("pat", pat)):
        m.transformer.decoder_layers[0].register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, args[0].clone()))
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        feat(x)
        pat(x)
        x2 = x.clone()
        x2[..., :2, :2] += 5.0  # the top-left anchor's neighbourhood only
        a = seen["feat"]
        feat(x2)
    assert a.shape == (1, 16, 32) and not torch.allclose(a[0, 0], a[0, 1])
    assert torch.allclose(seen["pat"][0], seen["pat"][0, :1].expand(16, -1))  # all queries alike
    assert not torch.allclose(seen["feat"][0, 0], a[0, 0])
    with pytest.raises(ValueError, match="query_content"):
        CellFinder(dataclasses.replace(TINY, query_content="bogus"), in_channels=8)  # type: ignore[arg-type]
