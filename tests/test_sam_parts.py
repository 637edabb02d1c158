"""Shapes, gradients and input validation of the SAM parts (encoder, prompt encoder, mask decoder)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from cellsam.models import image_encoder as image_encoder_module
from cellsam.models import two_way_transformer as two_way_module
from cellsam.models.image_encoder import EncoderOutput
from cellsam.models.sam_parts import build_sam_parts
from cellsam.registry import get_config


@pytest.fixture(scope="module")
def tiny_parts():
    torch.manual_seed(0)
    return build_sam_parts(get_config("vit_tiny"))


def _prompts(s: int, m: int, n: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    coords = torch.rand(n, 3, 2, generator=gen) * s
    labels = torch.tensor([[1, 0, -1], [1, 1, 0]])[:n]
    boxes = torch.tensor([[2.0, 3.0, s / 2, s / 2 + 1], [s / 4, s / 8, s - 1.0, s - 2.0]])[:n]
    masks = torch.randn(n, 1, m, m, generator=gen)
    return {"coords": coords, "labels": labels, "boxes": boxes, "masks": masks}


@pytest.mark.parametrize("variant", ["vit_tiny", "vit_cpu"])
def test_shapes(variant: str) -> None:
    cfg = get_config(variant)
    e = cfg.encoder
    s, d, c, g = e.img_size, e.out_chans, e.embed_dim, e.embedding_size
    enc, pe, dec = (m.eval() for m in build_sam_parts(cfg))
    n = 2
    p = _prompts(s, 4 * g, n)
    with torch.no_grad():
        out = enc(torch.rand(1, 3, s, s))
        assert isinstance(out, EncoderOutput)
        assert out.trunk.shape == (1, c, g, g)
        assert out.embedding.shape == (1, d, g, g)
        assert pe.get_dense_pe().shape == (1, d, g, g)
        cases = {
            "points": (((p["coords"], p["labels"]), None, None), 3 + 1),  # padding point added
            "boxes": ((None, p["boxes"], None), 2),
            "points+boxes": (((p["coords"], p["labels"]), p["boxes"], None), 3 + 2),
            "mask only": ((None, None, p["masks"]), 0),
        }
        for name, ((points, boxes, masks), t) in cases.items():
            sparse, dense = pe(points, boxes, masks)
            assert sparse.shape == (n, t, d), name
            assert dense.shape == (n, d, g, g), name
            for multi, m in ((True, 3), (False, 1)):
                low_res, iou = dec(out.embedding, pe.get_dense_pe(), sparse, dense, multi)
                assert low_res.shape == (n, m, 4 * g, 4 * g), name
                assert iou.shape == (n, m), name
                assert torch.isfinite(low_res).all() and torch.isfinite(iou).all()


def test_no_prompt_gives_batch_of_one(tiny_parts) -> None:
    _, pe, _ = tiny_parts
    sparse, dense = pe(None, None, None)
    assert sparse.shape == (1, 0, 32) and dense.shape == (1, 32, 8, 8)
    assert torch.equal(dense[0, :, 3, 5], pe.no_mask_embed.weight[0])


def test_gradient_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    cfg = get_config("vit_tiny")
    enc, pe, dec = build_sam_parts(cfg)
    p = _prompts(64, 32)
    emb = enc(torch.rand(1, 3, 64, 64)).embedding
    loss = emb.new_zeros(())
    # point-only prompts use the padding ("not a point") embedding and the no-mask embedding;
    # boxes + masks use the box corner embeddings and the mask downscaling convolutions.
    for prompts in (((p["coords"], p["labels"]), None, None), (None, p["boxes"], p["masks"])):
        sparse, dense = pe(*prompts)
        for multi in (True, False):
            low_res, iou = dec(emb, pe.get_dense_pe(), sparse, dense, multi)
            loss = loss + low_res.square().mean() + iou.square().mean()
    loss.backward()
    for part in (enc, pe, dec):
        missing = [n for n, q in part.named_parameters() if q.grad is None or not q.grad.abs().sum() > 0]
        assert not missing, f"{type(part).__name__}: no gradient for {missing}"


def test_broadcast_embedding_equals_repeated(tiny_parts) -> None:
    enc, pe, dec = (m.eval() for m in tiny_parts)
    p = _prompts(64, 32, n=2)
    with torch.no_grad():
        emb = enc(torch.rand(1, 3, 64, 64)).embedding
        sparse, dense = pe(None, p["boxes"], None)
        a = dec(emb, pe.get_dense_pe(), sparse, dense, True)
        b = dec(emb.repeat(2, 1, 1, 1), pe.get_dense_pe(), sparse, dense, True)
        single = dec(emb, pe.get_dense_pe(), sparse[1:], dense[1:], True)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    # prompts are decoded independently of each other
    torch.testing.assert_close(a[0][1:], single[0], atol=1e-5, rtol=1e-5)


def test_attention_uses_sdpa(tiny_parts, monkeypatch: pytest.MonkeyPatch) -> None:
    enc, pe, dec = (m.eval() for m in tiny_parts)
    calls: list[tuple[int, bool]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[-2], attn_mask is not None))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(image_encoder_module.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(two_way_module.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        emb = enc(torch.rand(1, 3, 64, 64)).embedding
        n_encoder = len(calls)
        sparse, dense = pe(None, torch.tensor([[1.0, 2.0, 30.0, 40.0]]), None)
        dec(emb, pe.get_dense_pe(), sparse, dense, False)
    assert n_encoder == 2 and all(has_mask for _, has_mask in calls[:n_encoder])  # rel-pos bias as mask
    assert [q for q, _ in calls[:2]] == [16, 64]  # window 4x4 block, then global 8x8 block
    assert len(calls) - n_encoder == 2 * 3 + 1  # 3 attentions per two-way layer + final


@pytest.mark.parametrize(
    "shape", [(1, 3, 32, 32), (1, 3, 64, 48), (1, 1, 64, 64), (3, 64, 64), (1, 3, 128, 128)]
)
def test_encoder_rejects_bad_input_size(tiny_parts, shape: tuple[int, ...]) -> None:
    enc = tiny_parts[0]
    with pytest.raises(ValueError, match="expects input of shape"):
        enc(torch.rand(*shape))


def test_encoder_rejects_integer_input(tiny_parts) -> None:
    with pytest.raises(TypeError, match="floating-point"):
        tiny_parts[0](torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_prompt_encoder_rejects_bad_prompts(tiny_parts) -> None:
    _, pe, _ = tiny_parts
    with pytest.raises(ValueError, match="boxes must have shape"):
        pe(None, torch.zeros(2, 5), None)
    with pytest.raises(ValueError, match="point labels"):
        pe((torch.zeros(2, 3, 2), torch.zeros(2, 2)), None, None)
    with pytest.raises(ValueError, match="masks must have shape"):
        pe(None, None, torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="batch sizes disagree"):
        pe((torch.zeros(2, 1, 2), torch.ones(2, 1)), torch.zeros(3, 4), None)


def test_mask_decoder_rejects_mismatched_batch(tiny_parts) -> None:
    _, pe, dec = tiny_parts
    sparse, dense = pe(None, torch.zeros(3, 4), None)
    with pytest.raises(ValueError, match="must be 1 or the number of prompts"):
        dec(torch.zeros(2, 32, 8, 8), pe.get_dense_pe(), sparse, dense, False)


def test_state_dict_keys_match_meta_names(tiny_parts) -> None:
    enc, pe, dec = tiny_parts
    keys = set(enc.state_dict())
    keys |= {"pe." + k for k in pe.state_dict()} | {"dec." + k for k in dec.state_dict()}
    for expected in [
        "patch_embed.proj.weight", "pos_embed", "blocks.0.attn.rel_pos_h", "blocks.1.attn.rel_pos_w",
        "blocks.1.mlp.lin2.bias", "neck.0.weight", "neck.3.bias",
        "pe.pe_layer.positional_encoding_gaussian_matrix", "pe.point_embeddings.3.weight",
        "pe.mask_downscaling.6.weight", "pe.no_mask_embed.weight", "pe.not_a_point_embed.weight",
        "dec.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
        "dec.transformer.final_attn_token_to_image.q_proj.bias", "dec.transformer.norm_final_attn.weight",
        "dec.output_hypernetworks_mlps.3.layers.2.weight", "dec.iou_prediction_head.layers.2.bias",
    ]:
        assert expected in keys, expected
    # windowed blocks size their tables for the window (4 -> 7), global ones for the grid (8 -> 15)
    assert enc.blocks[0].attn.rel_pos_h.shape == (7, 16)
    assert enc.blocks[1].attn.rel_pos_h.shape == (15, 16)
