"""The composition root: one encoder pass serves both heads; batched, chunked mask decoding."""

from __future__ import annotations

import math

import pytest
import torch

from cellsam.models.build import build_model
from cellsam.registry import get_config, list_variants


@pytest.fixture()
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("vit_tiny").eval()


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_one_encoder_pass_serves_detector_and_masks(tiny: torch.nn.Module) -> None:
    enc_calls = _count_calls(tiny.image_encoder)
    cf_calls = _count_calls(tiny.cellfinder)
    x = torch.rand(3, 3, 64, 64)
    out = tiny(x, box_threshold=0.0)
    assert enc_calls[0] == 1 and cf_calls[0] == 1  # a batch of 3 images: one pass of each
    assert len(out) == 3
    for r in out:
        n = r["boxes"].shape[0]
        assert n == tiny.cfg.cellfinder.num_query_position  # threshold 0 keeps every query
        assert r["low_res_logits"].shape == (n, 1, tiny.low_res_size, tiny.low_res_size)
        assert ((r["scores"] >= 0) & (r["scores"] <= 1)).all()
        assert (r["scores"][:-1] >= r["scores"][1:]).all()  # sorted
        b = r["boxes"]
        assert (b >= 0).all() and (b <= tiny.img_size).all() and (b[:, 2:] >= b[:, :2]).all()


def test_chunked_decoding_equals_one_batch_and_bounds_calls(tiny: torch.nn.Module) -> None:
    x = tiny.preprocess(torch.rand(1, 3, 64, 64))
    emb = tiny.encode(x).embedding
    boxes = torch.tensor([[4.0, 4, 20, 20], [10, 30, 40, 60], [0, 0, 63, 63], [30, 5, 50, 25], [1, 2, 3, 4]])
    dec_calls = _count_calls(tiny.mask_decoder)
    with torch.no_grad():
        full, iou_full = tiny.decode(emb, boxes=boxes, chunk_size=None)
        assert dec_calls[0] == 1
        chunked, iou_chunked = tiny.decode(emb, boxes=boxes, chunk_size=2)
        assert dec_calls[0] == 1 + 3
    torch.testing.assert_close(full, chunked, atol=1e-5, rtol=0)
    torch.testing.assert_close(iou_full, iou_chunked, atol=1e-5, rtol=0)
    # a memory budget sets the chunk: room for exactly 2 prompts -> 3 calls for 5 prompts
    budget = 2.5 * tiny.prompt_bytes() / 2**20
    dec_calls[0] = 0
    with torch.no_grad():
        tiny.decode(emb, boxes=boxes, memory_budget_mb=budget)
    assert dec_calls[0] == math.ceil(5 / 2)


def test_decode_validates_prompts(tiny: torch.nn.Module) -> None:
    emb = torch.zeros(1, 32, 8, 8)
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny.decode(emb)
    with pytest.raises(ValueError, match="disagree"):
        tiny.decode(emb, boxes=torch.zeros(2, 4), points=(torch.zeros(3, 1, 2), torch.ones(3, 1)))
    with pytest.raises(ValueError, match="one image embedding"):
        tiny.decode(torch.zeros(2, 32, 8, 8), boxes=torch.zeros(2, 4))
    lo, iou = tiny.decode(emb, boxes=torch.zeros(0, 4))
    assert lo.shape == (0, 1, 32, 32) and iou.shape == (0, 1)
    with pytest.raises(ValueError, match="expected images of shape"):
        tiny.preprocess(torch.rand(1, 3, 32, 32))


def test_gradient_reaches_every_parameter_used_by_box_prompts() -> None:
    torch.manual_seed(0)
    model = build_model("vit_tiny")
    x = model.preprocess(torch.rand(2, 3, 64, 64))
    enc = model.encode(x)
    out = model.detect(enc)
    loss = out["pred_logits"].sum() + out["pred_boxes"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_boxes"].sum() for a in out["aux_outputs"])
    lo, iou = model.decode(enc.embedding[:1], boxes=torch.tensor([[4.0, 4, 30, 30]]))
    lo2, iou2 = model.decode(enc.embedding[1:], points=(torch.tensor([[[10.0, 10]]]), torch.tensor([[1]])),
                             mask_input=torch.zeros(1, 1, 32, 32), multimask_output=True)
    (loss + lo.sum() + iou.sum() + lo2.sum() + iou2.sum()).backward()
    # point prompts use the point embeddings; the 4th mask token only serves multimask (used above)
    unused = {"prompt_encoder.point_embeddings.2.weight", "prompt_encoder.point_embeddings.3.weight",
              "prompt_encoder.not_a_point_embed.weight"}  # box corners / padding: not in this graph
    missing = [n for n, p in model.named_parameters() if p.grad is None and n not in unused]
    assert not missing, missing


def test_separate_detector_trunk_feeds_cellfinder() -> None:
    cfg = get_config("vit_tiny").replace(separate_detector_trunk=True)
    model = build_model(cfg).eval()
    x = model.preprocess(torch.rand(1, 3, 64, 64))
    enc = model.encode(x)
    with pytest.raises(ValueError, match="separate detector trunk"):
        model.detect(enc)
    neck_calls = _count_calls(model.detector_trunk.neck)
    out = model.detect(enc, x)
    assert neck_calls[0] == 0  # the detector's own trunk runs without its (unused) neck
    expected = model.cellfinder(model.detector_trunk(x).trunk)
    torch.testing.assert_close(out["pred_logits"], expected["pred_logits"])
    assert not torch.allclose(out["pred_logits"], model.cellfinder(enc.trunk)["pred_logits"])


@pytest.mark.parametrize("name", list_variants())
def test_every_variant_builds_with_consistent_sizes(name: str) -> None:
    cfg = get_config(name)
    assert cfg.encoder.img_size % cfg.encoder.patch_size == 0
    if cfg.encoder.embed_dim <= 256:  # big variants: config only, building them is slow
        model = build_model(cfg)
        assert model.low_res_size == 4 * cfg.encoder.embedding_size
        if cfg.detector_kind == "detr":
            assert model.cellfinder.transformer is not None
        else:  # the dense CellFinder reads the conv encoder's stride-4 trunk
            x = model.preprocess(torch.rand(1, 3, cfg.encoder.img_size, cfg.encoder.img_size))
            with torch.no_grad():
                enc = model.encode(x)
            side = cfg.encoder.img_size
            assert enc.trunk.shape[-1] == side // cfg.dense_finder.stride
            assert enc.embedding.shape[1:] == (cfg.encoder.out_chans, cfg.encoder.embedding_size,
                                               cfg.encoder.embedding_size)


def test_prompts_on_one_image_share_its_first_layer_work_with_the_same_result(tiny: torch.nn.Module) -> None:
    x = tiny.preprocess(torch.rand(1, 3, 64, 64))
    emb = tiny.encode(x).embedding
    boxes = torch.tensor([[4.0, 4, 20, 20], [10, 30, 40, 60], [0, 0, 63, 63], [30, 5, 50, 25]])
    first = tiny.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj
    rows: list[int] = []
    first.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    with torch.no_grad():
        sparse, dense = tiny.prompt_encoder(points=None, boxes=boxes, masks=None)
        pe = tiny.prompt_encoder.get_dense_pe()
        shared = tiny.mask_decoder(emb, pe, sparse, dense, multimask_output=False)
        assert rows == [1]  # the image side of layer 1 ran once for the 4 prompts
        copied = tiny.mask_decoder(emb, pe, sparse, dense.contiguous(), multimask_output=False)
        assert rows == [1, 4]  # materialised prompts: once per prompt
    for a, b in zip(shared, copied, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_auto_chunk_size_keeps_cpu_chunks_cache_sized() -> None:
    assert build_model("vit_b").auto_chunk_size() == 4  # 4 MiB of image tokens per prompt: the minimum
    small = build_model("vit_cpu")
    assert small.auto_chunk_size() == 8  # 0.5 MiB per prompt
    emb = torch.zeros(1, small.cfg.encoder.out_chans, *(2 * [small.cfg.encoder.embedding_size]))
    calls = _count_calls(small.mask_decoder)
    with torch.no_grad():
        small.decode(emb, boxes=torch.tensor([[0.0, 0, 10, 10]]).repeat(20, 1))
    assert calls[0] == 3  # 20 prompts in chunks of 8


def test_windowed_masks_equal_whole_frames_inside_their_windows(tiny: torch.nn.Module) -> None:
    """decode(window=): each mask computed on a token window about its box gives the whole-frame logits
    there and WINDOW_FILL elsewhere; IoUs unchanged; prompts come back in their order although chunks
    are formed by window size."""
    from cellsam.models.mask_decoder import WINDOW_FILL

    x = tiny.preprocess(torch.rand(1, 3, 64, 64))
    emb = tiny.encode(x).embedding
    # token = 8 px of the 64 px input, grid 8x8: sides ceil(1 x longer / 8 + 2) = 3, 4, 3, 8 (whole), 4
    boxes = torch.tensor([[4.0, 4, 10, 9], [40, 30, 52, 46], [56, 56, 63, 63], [0, 0, 60, 40], [20, 2, 35, 8]])
    origins, sides = tiny.box_windows(boxes, 1.0)
    assert sides.tolist() == [3, 4, 3, 8, 4]
    assert (origins >= 0).all() and ((origins + sides[:, None]) <= 8).all()
    assert origins[2].tolist() == [5, 5]  # the corner box: its window is pushed inside the grid
    with torch.no_grad():
        full, iou_full = tiny.decode(emb, boxes=boxes, chunk_size=2)
        win, iou_win = tiny.decode(emb, boxes=boxes, chunk_size=2, window=1.0)
    torch.testing.assert_close(iou_win, iou_full, atol=1e-5, rtol=0)
    # chunks of 2 sorted by side: [3, 3], [4, 4], [8] -> windows of 3 and 4 tokens and the whole grid
    for i, k in enumerate(sides.tolist()):
        r0, c0 = (tiny.box_windows(boxes[i : i + 1], 1.0, side=k)[0][0] * 4).tolist()
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[r0 : r0 + 4 * k, c0 : c0 + 4 * k] = True
        torch.testing.assert_close(win[i, 0][inside], full[i, 0][inside], atol=1e-5, rtol=0)
        assert (win[i, 0][~inside] == WINDOW_FILL).all()
        assert int(inside.sum()) == (32 * 32 if k == 8 else 16 * k * k)


def test_windowed_decoding_rejects_what_it_cannot_do(tiny: torch.nn.Module) -> None:
    emb = tiny.encode(tiny.preprocess(torch.rand(1, 3, 64, 64))).embedding
    boxes = torch.tensor([[4.0, 4, 10, 9]])
    pts = (torch.tensor([[[8.0, 8.0]]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="only for box prompts"):
        tiny.decode(emb, points=pts, window=2.0)
    with pytest.raises(ValueError, match="> 0"):
        tiny.decode(emb, boxes=boxes, window=0.0)
    src = torch.zeros(1, 64, tiny.mask_decoder.transformer_dim)
    from cellsam.models.mask_decoder import _gather_windows

    with pytest.raises(ValueError, match="inside the 8x8 grid"):
        _gather_windows(src, (torch.tensor([[6, 0]]), 3), (8, 8))


def test_untrained_multimask_outputs_are_never_returned() -> None:
    """A model whose multimask outputs were not trained (inference.multimask False) decodes one mask
    for every prompt, whatever multimask_output asks; SAM-style models keep their three."""
    import dataclasses

    torch.manual_seed(0)
    sam_like = build_model("vit_tiny").eval()
    ours = build_model(sam_like.cfg.replace(inference=dataclasses.replace(sam_like.cfg.inference, multimask=False)))
    ours.load_state_dict(sam_like.state_dict())
    ours.eval()
    emb = sam_like.encode(sam_like.preprocess(torch.rand(1, 3, 64, 64))).embedding
    pts = (torch.tensor([[[20.0, 30.0]]]), torch.ones(1, 1, dtype=torch.long))
    with torch.no_grad():
        lo3, iou3 = sam_like.decode(emb, points=pts, multimask_output=True)
        lo1, iou1 = ours.decode(emb, points=pts, multimask_output=True)
        single, _ = sam_like.decode(emb, points=pts, multimask_output=False)
    assert lo3.shape[1] == 3 and iou3.shape == (1, 3)
    assert lo1.shape[1] == 1 and iou1.shape == (1, 1)
    torch.testing.assert_close(lo1, single)  # the trained single-mask output


def test_local_decoding_reads_only_the_window(tiny: torch.nn.Module) -> None:
    """inference.local_decoding: a box's mask depends only on the embedding inside its token window
    (changing the rest leaves it unchanged, but changes the whole-grid decoding), and a window that
    covers the whole grid gives SAM's whole-grid logits."""
    import dataclasses

    from cellsam.models.mask_decoder import WINDOW_FILL

    emb = tiny.encode(tiny.preprocess(torch.rand(1, 3, 64, 64))).embedding
    boxes = torch.tensor([[4.0, 4, 10, 9], [0, 0, 60, 40]])  # windows of 3 tokens and of the whole 8x8 grid
    origins, sides = tiny.box_windows(boxes, 1.0)
    assert sides.tolist() == [3, 8]
    r0, c0 = origins[0].tolist()
    far = emb.clone()
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep[r0 : r0 + 3, c0 : c0 + 3] = True
    far[..., ~keep] += torch.randn_like(far[..., ~keep])  # the embedding outside box 0's window changes
    inf = tiny.cfg.inference
    with torch.no_grad():
        glob, _ = tiny.decode(emb, boxes=boxes, chunk_size=1, window=1.0)
        glob_far, _ = tiny.decode(far, boxes=boxes[:1], window=1.0)
        tiny.cfg = tiny.cfg.replace(inference=dataclasses.replace(inf, local_decoding=True))
        loc, _ = tiny.decode(emb, boxes=boxes, chunk_size=1, window=1.0)
        loc_far, _ = tiny.decode(far, boxes=boxes[:1], window=1.0)
    inside = loc[0, 0] != WINDOW_FILL
    assert int(inside.sum()) == 12 * 12
    torch.testing.assert_close(loc_far[0], loc[0], atol=1e-5, rtol=0)  # only the window is read
    assert (glob_far[0, 0][inside] - glob[0, 0][inside]).abs().max() > 1e-3  # SAM's attention reads it all
    assert (loc[0, 0][inside] - glob[0, 0][inside]).abs().max() > 1e-4  # so local values differ ...
    torch.testing.assert_close(loc[1], glob[1], atol=1e-5, rtol=0)  # ... except for a whole-grid window
