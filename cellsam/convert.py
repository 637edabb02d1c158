"""Importers for foreign checkpoints: Meta's SAM ``.pth`` and the official CellSAM ``.pt``.

Meta SAM (``sam_vit_b_01ec64.pth``): keys ``image_encoder.*``, ``prompt_encoder.*``,
``mask_decoder.*`` map 1:1 onto our modules of the same names; the architecture is read off
the tensor shapes (:func:`sam_config_from_state_dict`).

Official CellSAM (``cellsam_general.pt``, 1,041 keys)::

    model.{image_encoder,prompt_encoder,mask_decoder}.*     -> ours 1:1 (prefix "model." removed)
    model_cp.*                                               -> dropped (a second SAM copy, unused)
    cellfinder.decode_head.backbone.body.*                   -> shared with image_encoder if equal,
                                                                else detector_trunk.* (+ neck copied)
    cellfinder.decode_head.input_proj.0.{0,1}.*              -> cellfinder.input_proj.{0,1}.*
    cellfinder.decode_head.transformer.{class,bbox}_embed.0.* -> cellfinder.transformer.{class,bbox}_embed.*
    cellfinder.decode_head.transformer.{class,bbox}_embed.k.* -> dropped (k = 1..5: the same shared head)
    cellfinder.decode_head.transformer.<rest>                -> cellfinder.transformer.<rest>

(see :mod:`cellsam.models.cellfinder` for our CellFinder's names).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
from torch import Tensor

from cellsam.config import CellSAMConfig, EncoderConfig, MaskDecoderConfig, PromptEncoderConfig
from cellsam.registry import get_config, list_variants

logger = logging.getLogger(__name__)

SAM_MODULES = ("image_encoder", "prompt_encoder", "mask_decoder")
_OFFICIAL_CF = "cellfinder.decode_head."
_OFFICIAL_GROUPS = (
    "model.",
    "model_cp.",
    _OFFICIAL_CF + "backbone.body.",
    _OFFICIAL_CF + "input_proj.",
    _OFFICIAL_CF + "transformer.",
)
_STANDARD_HEADS = {768: 12, 1024: 16, 1280: 16}  # encoder heads of Meta's models without rel. positions


class ConversionError(ValueError):
    """A checkpoint does not have the layout the importer expects."""


def checkpoint_kind(sd: dict[str, Tensor]) -> str:
    """``"official"`` (CellSAM .pt), ``"sam"`` (Meta SAM .pth) or ``"unknown"``."""
    if any(k.startswith(_OFFICIAL_CF) or k.startswith("model.image_encoder.") for k in sd):
        return "official"
    if (
        sd
        and all(k.split(".", 1)[0] in SAM_MODULES for k in sd)
        and any(k.startswith("image_encoder.") for k in sd)
    ):
        return "sam"
    return "unknown"


def _need(sd: dict[str, Tensor], key: str) -> Tensor:
    if key not in sd:
        raise ConversionError(f"checkpoint lacks the key {key!r}")
    return sd[key]


def _indices(sd: dict[str, Tensor], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _infer_encoder(sd: dict[str, Tensor]) -> EncoderConfig:
    p = "image_encoder."
    proj = _need(sd, p + "patch_embed.proj.weight")  # (C, in_chans, patch, patch)
    embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    blocks = _indices(sd, p + "blocks.")
    if not blocks or blocks != list(range(len(blocks))):
        raise ConversionError(f"image_encoder blocks are missing or not numbered 0..n-1: {blocks}")
    use_abs_pos = p + "pos_embed" in sd
    use_rel_pos = p + "blocks.0.attn.rel_pos_h" in sd
    grid = sd[p + "pos_embed"].shape[1] if use_abs_pos else None
    rel = [sd[f"{p}blocks.{i}.attn.rel_pos_h"].shape for i in blocks] if use_rel_pos else []
    if grid is None:
        if not rel:
            raise ConversionError(
                "cannot infer the encoder input size: no pos_embed and no relative positions"
            )
        grid = (max(r[0] for r in rel) + 1) // 2
    if rel:
        num_heads = embed_dim // rel[0][1]
        global_idx = tuple(i for i, r in zip(blocks, rel, strict=True) if r[0] == 2 * grid - 1)
        windowed = [r[0] for r in rel if r[0] != 2 * grid - 1]
        window = (windowed[0] + 1) // 2 if windowed else grid
        if any(w != windowed[0] for w in windowed):
            raise ConversionError("windowed blocks of different window sizes are not supported")
    else:
        if embed_dim not in _STANDARD_HEADS:
            raise ConversionError(
                f"cannot infer the number of heads of a {embed_dim}-wide encoder without relative positions"
            )
        num_heads, global_idx, window = _STANDARD_HEADS[embed_dim], (), EncoderConfig().window_size
    return EncoderConfig(
        img_size=grid * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=len(blocks),
        num_heads=num_heads,
        mlp_ratio=_need(sd, p + "blocks.0.mlp.lin1.weight").shape[0] / embed_dim,
        out_chans=_need(sd, p + "neck.0.weight").shape[0],
        qkv_bias=p + "blocks.0.attn.qkv.bias" in sd,
        use_abs_pos=use_abs_pos,
        use_rel_pos=use_rel_pos,
        window_size=window,
        global_attn_indexes=global_idx,
    )


def _infer_mask_decoder(sd: dict[str, Tensor], width: int) -> MaskDecoderConfig:
    p = "mask_decoder."
    layers = _indices(sd, p + "transformer.layers.")
    q = _need(sd, p + "transformer.layers.0.cross_attn_token_to_image.q_proj.weight")  # (width / rate, width)
    iou_layers = _indices(sd, p + "iou_prediction_head.layers.")
    return MaskDecoderConfig(
        transformer_depth=len(layers),
        transformer_mlp_dim=_need(sd, p + "transformer.layers.0.mlp.lin1.weight").shape[0],
        transformer_num_heads=MaskDecoderConfig().transformer_num_heads,  # not visible in shapes; Meta's 8
        attention_downsample_rate=width // q.shape[0],
        num_multimask_outputs=_need(sd, p + "mask_tokens.weight").shape[0] - 1,
        iou_head_depth=len(iou_layers),
        iou_head_hidden_dim=_need(sd, p + "iou_prediction_head.layers.0.weight").shape[0],
    )


def _sam_parts_equal(a: CellSAMConfig, b: CellSAMConfig) -> bool:
    """Equal SAM parts, ignoring the decoder head count (which shapes cannot show)."""
    heads = a.mask_decoder.transformer_num_heads
    return (
        a.encoder == b.encoder
        and a.prompt_encoder == b.prompt_encoder
        and a.mask_decoder == dataclasses.replace(b.mask_decoder, transformer_num_heads=heads)
    )


def _matching_variant(cfg: CellSAMConfig) -> str | None:
    for name in ("vit_b", "vit_l", "vit_h", *list_variants()):
        if name in list_variants() and _sam_parts_equal(get_config(name), cfg):
            return name
    return None


def sam_config_from_state_dict(sd: dict[str, Tensor]) -> CellSAMConfig:
    """The architecture of a SAM state dict (keys ``image_encoder.*`` ...), read off its shapes.

    If the SAM parts equal those of a registered variant, that variant's whole config is returned
    (its CellFinder and mask-decoder head count included); otherwise the inferred SAM parts with
    the paper's CellFinder and Meta's 8 mask-decoder heads.
    """
    enc = _infer_encoder(sd)
    mask_in = _need(sd, "prompt_encoder.mask_downscaling.3.weight").shape[0]
    cfg = CellSAMConfig(
        encoder=enc,
        prompt_encoder=PromptEncoderConfig(mask_in_chans=mask_in),
        mask_decoder=_infer_mask_decoder(sd, enc.out_chans),
    )
    name = _matching_variant(cfg)
    return get_config(name) if name is not None else cfg


def infer_sam_variant(sd: dict[str, Tensor]) -> str:
    """Name of the registered variant whose SAM parts match ``sd`` (e.g. ``"vit_b"`` for 768 wide,
    12 deep); ``ConversionError`` naming the inferred sizes when none does."""
    enc = _infer_encoder(sd)
    mask_in = _need(sd, "prompt_encoder.mask_downscaling.3.weight").shape[0]
    cfg = CellSAMConfig(
        encoder=enc,
        prompt_encoder=PromptEncoderConfig(mask_in_chans=mask_in),
        mask_decoder=_infer_mask_decoder(sd, enc.out_chans),
    )
    name = _matching_variant(cfg)
    if name is None:
        raise ConversionError(
            f"no registered variant matches this SAM checkpoint "
            f"(encoder {enc.embed_dim} wide, {enc.depth} deep, "
            f"{enc.num_heads} heads, input {enc.img_size}); registered: {list_variants()}"
        )
    return name


def sam_state_dict_to_cellsam(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Meta SAM state dict -> our ``image_encoder.* / prompt_encoder.* / mask_decoder.*`` keys (1:1)."""
    bad = sorted(k for k in sd if k.split(".", 1)[0] not in SAM_MODULES)
    if bad:
        raise ConversionError(
            f"not a SAM state dict: unexpected keys {bad[:12]}"
            + (f" and {len(bad) - 12} more" if len(bad) > 12 else "")
        )
    return dict(sd)


def _cellfinder_config(tf: dict[str, Tensor], base: CellSAMConfig) -> CellSAMConfig:
    pattern = _need(tf, "pattern.weight")  # (patterns, d)
    d = pattern.shape[1]
    in_proj = _need(tf, "decoder_layers.0.cross_attn.in_proj_weight")
    cf = dataclasses.replace(
        base.cellfinder,
        d_model=d,
        enc_layers=len(_indices(tf, "encoder_layers.")),
        dec_layers=len(_indices(tf, "decoder_layers.")),
        dim_feedforward=_need(tf, "decoder_layers.0.ffn.linear1.weight").shape[0],
        dropout=0.0,
        num_query_position=_need(tf, "position.weight").shape[0],
        num_query_pattern=pattern.shape[0],
        num_classes=_need(tf, "class_embed.0.weight").shape[0],
        spatial_prior="learned",
        attention_type="RCDA" if in_proj.shape[0] == 5 * d else "nn.MultiheadAttention",
    )
    return dataclasses.replace(base, cellfinder=cf)


def _shared_head(tf: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """``name.0.*`` of a head registered once per decoder layer; the copies must be identical."""
    copies = _indices(tf, name + ".")
    if 0 not in copies:
        raise ConversionError(f"checkpoint lacks cellfinder.decode_head.transformer.{name}.0.*")
    first = {k[len(f"{name}.0.") :]: v for k, v in tf.items() if k.startswith(f"{name}.0.")}
    for i in copies[1:]:
        for sub, v in first.items():
            other = tf.get(f"{name}.{i}.{sub}")
            if other is None or not torch.equal(other, v):
                raise ConversionError(
                    f"transformer.{name}.{i}.{sub} differs from {name}.0: "
                    "the official heads are one module shared by all decoder layers"
                )
    return first


def official_state_dict_to_cellsam(sd: dict[str, Tensor]) -> tuple[CellSAMConfig, dict[str, Tensor]]:
    """Official CellSAM state dict -> (our config, our state dict); see the module docstring.

    Raises:
        ConversionError: keys outside the expected groups, a detector trunk whose keys do not
            match the SAM encoder's, or shared-head copies that differ.
    """
    groups: dict[str, dict[str, Tensor]] = {g: {} for g in _OFFICIAL_GROUPS}
    other = []
    for k, v in sd.items():
        g = next((g for g in _OFFICIAL_GROUPS if k.startswith(g)), None)
        if g is None:
            other.append(k)
        else:
            groups[g][k[len(g) :]] = v
    if other:
        raise ConversionError(f"unexpected keys in the official CellSAM checkpoint: {sorted(other)[:12]}")
    sam, sam_cp, body = groups["model."], groups["model_cp."], groups[_OFFICIAL_CF + "backbone.body."]
    proj, tf = groups[_OFFICIAL_CF + "input_proj."], groups[_OFFICIAL_CF + "transformer."]
    if sam_cp:
        logger.info(
            "dropping model_cp.* (%d keys): the official checkpoint's second SAM copy is not used",
            len(sam_cp),
        )
    cfg = _cellfinder_config(tf, sam_config_from_state_dict(sam))
    out = sam_state_dict_to_cellsam(sam)

    trunk_keys = {k[len("image_encoder.") :] for k in sam if k.startswith("image_encoder.")}
    trunk_keys = {k for k in trunk_keys if not k.startswith("neck.")}
    if set(body) != trunk_keys:
        raise ConversionError(
            "cellfinder.decode_head.backbone.body.* does not match the SAM encoder trunk: missing "
            f"{sorted(trunk_keys - set(body))[:8]}, unexpected {sorted(set(body) - trunk_keys)[:8]}"
        )
    shared = all(torch.equal(v, sam["image_encoder." + k]) for k, v in body.items())
    if shared:
        logger.info("the detector's ViT equals the SAM encoder: one shared encoder pass")
    else:
        logger.info("the detector's ViT differs from the SAM encoder: keeping a separate detector trunk")
        cfg = cfg.replace(separate_detector_trunk=True)
        out.update({f"detector_trunk.{k}": v for k, v in body.items()})
        # the detector uses the trunk only; its neck is never run but the module has one
        out.update(
            {
                f"detector_trunk.{k[len('image_encoder.') :]}": v
                for k, v in sam.items()
                if k.startswith("image_encoder.neck.")
            }
        )

    for k, v in proj.items():
        m = re.fullmatch(r"0\.([01])\.(weight|bias)", k)
        if m is None:
            raise ConversionError(f"unexpected input projection key cellfinder.decode_head.input_proj.{k}")
        out[f"cellfinder.input_proj.{m.group(1)}.{m.group(2)}"] = v
    for head in ("class_embed", "bbox_embed"):
        out.update({f"cellfinder.transformer.{head}.{k}": v for k, v in _shared_head(tf, head).items()})
    for k, v in tf.items():
        if not (k.startswith("class_embed.") or k.startswith("bbox_embed.")):
            out[f"cellfinder.transformer.{k}"] = v
    return cfg, out
