"""Numerical parity of our SAM parts with Meta's ``segment_anything`` 1.0 (random weights).

Meta's state-dict slices load strictly into our modules; then image embeddings, mask logits and
IoU predictions must agree to 1e-4 (float32) for point, box, point+box and mask prompts.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from torch import nn

from cellsam.config import CellSAMConfig
from cellsam.models.sam_parts import build_sam_parts
from cellsam.registry import get_config

sam = pytest.importorskip("segment_anything")
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT as MetaEncoder,
)
from segment_anything.modeling import (  # noqa: E402
    MaskDecoder as MetaMaskDecoder,
)
from segment_anything.modeling import (  # noqa: E402
    PromptEncoder as MetaPromptEncoder,
)
from segment_anything.modeling import (  # noqa: E402
    TwoWayTransformer as MetaTwoWayTransformer,
)

TOL = 1e-4


def _meta_parts(cfg: CellSAMConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Meta's modules with the hyper-parameters of one of our configs."""
    enc, dec = cfg.encoder, cfg.mask_decoder
    grid = enc.embedding_size
    image_encoder = MetaEncoder(
        img_size=enc.img_size, patch_size=enc.patch_size, in_chans=enc.in_chans, embed_dim=enc.embed_dim,
        depth=enc.depth, num_heads=enc.num_heads, mlp_ratio=enc.mlp_ratio, out_chans=enc.out_chans,
        qkv_bias=enc.qkv_bias, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos=enc.use_abs_pos,
        use_rel_pos=enc.use_rel_pos, window_size=enc.window_size, global_attn_indexes=enc.global_attn_indexes,
    )
    prompt_encoder = MetaPromptEncoder(
        embed_dim=enc.out_chans, image_embedding_size=(grid, grid),
        input_image_size=(enc.img_size, enc.img_size), mask_in_chans=cfg.prompt_encoder.mask_in_chans,
    )
    mask_decoder = MetaMaskDecoder(
        transformer_dim=enc.out_chans,
        transformer=MetaTwoWayTransformer(
            depth=dec.transformer_depth, embedding_dim=enc.out_chans, mlp_dim=dec.transformer_mlp_dim,
            num_heads=dec.transformer_num_heads, attention_downsample_rate=dec.attention_downsample_rate,
        ),
        num_multimask_outputs=dec.num_multimask_outputs, iou_head_depth=dec.iou_head_depth,
        iou_head_hidden_dim=dec.iou_head_hidden_dim,
    )
    return image_encoder, prompt_encoder, mask_decoder


@torch.no_grad()
def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Perturb every parameter; zero-initialised tables (rel_pos, pos_embed) become random."""
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "rel_pos" in name or "pos_embed" in name:
            p.copy_(noise * 0.5)
        else:
            p.add_(noise * 0.02)


def _sub_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _prompts(cfg: CellSAMConfig, gen: torch.Generator, n: int = 3) -> dict[str, torch.Tensor]:
    s = cfg.encoder.img_size
    m = 4 * cfg.encoder.embedding_size
    coords = torch.rand(n, 2, 2, generator=gen) * s
    labels = torch.tensor([[1, 0], [1, -1], [0, 1]])[:n]
    xy = torch.rand(n, 2, generator=gen) * s * 0.6
    wh = torch.rand(n, 2, generator=gen) * s * 0.4 + 2
    boxes = torch.cat([xy, xy + wh], dim=1)
    masks = torch.randn(n, 1, m, m, generator=gen) * 3
    return {"coords": coords, "labels": labels, "boxes": boxes, "masks": masks}


CASES = {
    "points": lambda p: ((p["coords"], p["labels"]), None, None),
    "boxes": lambda p: (None, p["boxes"], None),
    "points+boxes": lambda p: ((p["coords"], p["labels"]), p["boxes"], None),
    "boxes+mask": lambda p: (None, p["boxes"], p["masks"]),
    "points+mask": lambda p: ((p["coords"], p["labels"]), None, p["masks"]),
}


def _check_parity(
    cfg: CellSAMConfig, meta: tuple[nn.Module, nn.Module, nn.Module], seed: int
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    for part in meta:
        _randomise(part, gen)
    ours = build_sam_parts(cfg)
    for mine, theirs in zip(ours, meta, strict=True):
        mine.load_state_dict(theirs.state_dict(), strict=True)
        mine.eval()
        theirs.eval()
    enc, pe, dec = ours
    m_enc, m_pe, m_dec = meta

    diffs: dict[str, float] = {}
    s = cfg.encoder.img_size
    x = torch.randn(1, 3, s, s, generator=gen)
    captured: list[torch.Tensor] = []
    hook = m_enc.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.append(out))
    with torch.no_grad():
        out = enc(x)
        m_emb = m_enc(x)
    hook.remove()
    diffs["trunk"] = (out.trunk - captured[0].permute(0, 3, 1, 2)).abs().max().item()
    diffs["embedding"] = (out.embedding - m_emb).abs().max().item()
    assert torch.equal(pe.get_dense_pe(), m_pe.get_dense_pe())

    prompts = _prompts(cfg, gen)
    for case, make in CASES.items():
        points, boxes, masks = make(prompts)
        with torch.no_grad():
            sparse, dense = pe(points, boxes, masks)
            m_sparse, m_dense = m_pe(points=points, boxes=boxes, masks=masks)
            diffs[f"{case}/sparse"] = (sparse - m_sparse).abs().max().item()
            diffs[f"{case}/dense"] = (dense - m_dense).abs().max().item()
            for multi in (False, True):
                lo, iou = dec(out.embedding, pe.get_dense_pe(), sparse, dense, multi)
                m_lo, m_iou = m_dec(
                    image_embeddings=m_emb, image_pe=m_pe.get_dense_pe(), sparse_prompt_embeddings=m_sparse,
                    dense_prompt_embeddings=m_dense, multimask_output=multi,
                )
                assert lo.shape == m_lo.shape and iou.shape == m_iou.shape
                diffs[f"{case}/multi={multi}/masks"] = (lo - m_lo).abs().max().item()
                diffs[f"{case}/multi={multi}/iou"] = (iou - m_iou).abs().max().item()
    return diffs


def _padded_tiny() -> CellSAMConfig:
    """vit_tiny with a 10x10 grid and window 4, so windowed blocks need padding (like vit_b: 64 / 14)."""
    base = get_config("vit_tiny")
    enc = dataclasses.replace(base.encoder, img_size=80, depth=3, global_attn_indexes=(1,))
    return base.replace(encoder=enc)


@pytest.mark.parametrize(
    "make_cfg", [lambda: get_config("vit_tiny"), _padded_tiny], ids=["vit_tiny", "padded"]
)
def test_small_config_parity(make_cfg) -> None:
    cfg = make_cfg()
    diffs = _check_parity(cfg, _meta_parts(cfg), seed=0)
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"largest difference {diffs[worst]:.3g} at {worst}: {diffs}"


def test_randomisation_makes_outputs_depend_on_rel_pos() -> None:
    """Guard against a vacuous parity test: the rel-pos tables must change the embedding."""
    cfg = get_config("vit_tiny")
    m_enc = _meta_parts(cfg)[0]
    _randomise(m_enc, torch.Generator().manual_seed(0))
    enc = build_sam_parts(cfg)[0].eval()
    enc.load_state_dict(m_enc.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = enc(x).embedding
        enc.blocks[0].attn.rel_pos_h.mul_(-1.0)
        after = enc(x).embedding
    assert (before - after).abs().max().item() > 1e-3


@pytest.mark.slow
def test_vit_b_parity_with_meta_sam() -> None:
    from segment_anything import sam_model_registry

    meta_sam = sam_model_registry["vit_b"]()
    meta_sd = meta_sam.state_dict()
    cfg = get_config("vit_b")
    ours = build_sam_parts(cfg)
    for mine, prefix in zip(ours, ("image_encoder.", "prompt_encoder.", "mask_decoder."), strict=True):
        mine.load_state_dict(_sub_state_dict(meta_sd, prefix), strict=True)
    meta = (meta_sam.image_encoder, meta_sam.prompt_encoder, meta_sam.mask_decoder)
    diffs = _check_parity(cfg, meta, seed=0)
    worst = max(diffs, key=diffs.get)
    print(f"vit_b parity: largest difference {diffs[worst]:.3g} at {worst}")
    assert diffs[worst] <= TOL, f"largest difference {diffs[worst]:.3g} at {worst}: {diffs}"
