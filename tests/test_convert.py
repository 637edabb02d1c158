"""Importers: Meta SAM state dicts and the official CellSAM checkpoint layout (cellsam.convert)."""

from __future__ import annotations

import logging

import pytest
import torch

from cellsam import convert
from cellsam.convert import ConversionError
from cellsam.models.build import build_model
from cellsam.registry import get_config
from cellsam.weights import load_model

SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


def _meta_shapes(name: str) -> dict[str, torch.Tensor]:
    """State dict of Meta's model ``name`` with shapes only (meta tensors: no memory, no init time)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        return sam_model_registry[name]().state_dict()


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_infer_sam_variant_from_meta_shapes(name):
    sd = _meta_shapes(name)
    assert convert.checkpoint_kind(sd) == "sam"
    assert convert.infer_sam_variant(sd) == name
    cfg = convert.sam_config_from_state_dict(sd)
    assert cfg == get_config(name)


def test_sam_config_of_our_tiny_model_and_unknown_sizes():
    model = build_model("vit_tiny")
    sam = {k: v for k, v in model.state_dict().items() if k.startswith(SAM_PREFIXES)}
    assert convert.infer_sam_variant(sam) == "vit_tiny"
    assert convert.sam_config_from_state_dict(sam) == get_config("vit_tiny")
    odd = {**sam, "image_encoder.blocks.0.mlp.lin1.weight": torch.zeros(96, 32)}  # mlp ratio 3: no variant
    with pytest.raises(ConversionError, match="no registered variant.*32 wide, 2 deep"):
        convert.infer_sam_variant(odd)
    assert convert.sam_config_from_state_dict(odd).encoder.mlp_ratio == 3.0
    with pytest.raises(ConversionError, match="unexpected keys"):
        convert.sam_state_dict_to_cellsam({**sam, "cellfinder.x": torch.zeros(1)})


def to_official(model: torch.nn.Module, *, copy_seed: int = 5) -> dict[str, torch.Tensor]:
    """Write ``model`` in the official cellsam_general.pt key layout (SPEC section 2)."""
    sd = model.state_dict()
    g = torch.Generator().manual_seed(copy_seed)
    out: dict[str, torch.Tensor] = {}
    trunk_src = "detector_trunk." if model.detector_trunk is not None else "image_encoder."
    dec_layers = model.cfg.cellfinder.dec_layers
    for k, v in sd.items():
        if k.startswith(SAM_PREFIXES):
            out["model." + k] = v.clone()
            noise = 0 if v.is_meta else torch.randn(v.shape, generator=g)
            out["model_cp." + k] = v + noise  # a diverged second copy
        if k.startswith(trunk_src) and not k.startswith(trunk_src + "neck."):
            out["cellfinder.decode_head.backbone.body." + k[len(trunk_src):]] = v.clone()
        if k.startswith("cellfinder.input_proj."):
            out["cellfinder.decode_head.input_proj.0." + k[len("cellfinder.input_proj."):]] = v.clone()
        if k.startswith("cellfinder.transformer."):
            rest = k[len("cellfinder.transformer."):]
            head = next((h for h in ("class_embed.", "bbox_embed.") if rest.startswith(h)), None)
            if head is None:
                out["cellfinder.decode_head.transformer." + rest] = v.clone()
            else:
                for i in range(dec_layers):  # Anchor DETR registers the shared head once per layer
                    out[f"cellfinder.decode_head.transformer.{head}{i}.{rest[len(head):]}"] = v.clone()
    return out


def _run(model, x):
    with torch.no_grad():
        xp = model.preprocess(x)
        enc = model.encode(xp)
        det = model.detect(enc, xp)
        lo, iou = model.decode(enc.embedding[:1], boxes=torch.tensor([[3.0, 5.0, 30.0, 41.0]]), multimask_output=True)
    return [enc.embedding, det["pred_logits"], det["pred_boxes"], lo, iou]


@pytest.mark.parametrize("separate", [False, True])
def test_official_import_round_trip(tmp_path, caplog, separate):
    torch.manual_seed(0)
    cfg = get_config("vit_tiny").replace(separate_detector_trunk=separate)
    source = build_model(cfg).eval()
    official = to_official(source)
    n_cp = sum(k.startswith("model_cp.") for k in official)
    path = tmp_path / "cellsam_general.pt"
    torch.save(official, path)
    with caplog.at_level(logging.INFO, logger="cellsam.convert"):
        model = load_model(path)
    assert any("model_cp" in r.getMessage() and str(n_cp) in r.getMessage() for r in caplog.records)
    assert model.cfg.separate_detector_trunk is separate
    assert (model.detector_trunk is not None) is separate
    assert model.cfg.cellfinder.dropout == 0.0 and model.cfg.cellfinder.num_classes == 2
    ref = source.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("detector_trunk.neck."):  # the detector never runs its neck
            assert torch.equal(v, ref[k]), k
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for a, b in zip(_run(source, x), _run(model, x), strict=True):
        assert torch.equal(a, b)


def test_official_importer_rejects_bad_layouts():
    torch.manual_seed(0)
    official = to_official(build_model("vit_tiny"))
    bad = dict(official)
    bad["cellfinder.decode_head.transformer.class_embed.1.bias"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"class_embed\.1\.bias differs"):
        convert.official_state_dict_to_cellsam(bad)
    with pytest.raises(ConversionError, match="stray.key"):
        convert.official_state_dict_to_cellsam({**official, "stray.key": torch.zeros(1)})
    short = {k: v for k, v in official.items() if k != "cellfinder.decode_head.backbone.body.pos_embed"}
    with pytest.raises(ConversionError, match="pos_embed"):
        convert.official_state_dict_to_cellsam(short)
    assert convert.checkpoint_kind(official) == "official"
    assert convert.checkpoint_kind({"foo": torch.zeros(1)}) == "unknown"


def test_vit_b_official_layout_has_the_published_key_counts():
    """SPEC section 2: 1,041 keys = 314 (model) + 314 (model_cp) + 413 (cellfinder)."""
    with torch.device("meta"):
        model = build_model("vit_b")
    official = to_official(model)
    counts = {p: sum(k.startswith(p) for k in official) for p in ("model.", "model_cp.", "cellfinder.")}
    assert counts == {"model.": 314, "model_cp.": 314, "cellfinder.": 413}
