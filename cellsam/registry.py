"""Named architecture variants and named, versioned weights.

Variants are functions returning a :class:`~cellsam.config.CellSAMConfig`; they are
registered with :func:`register_variant`. Weights are :class:`WeightsRecord` entries
(``name.tag`` -> url + sha256 + variant) registered with :func:`register_weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cellsam.config import (
    CellFinderConfig,
    CellSAMConfig,
    ConvEncoderConfig,
    EncoderConfig,
    MaskDecoderConfig,
)

_VARIANTS: dict[str, Callable[[], CellSAMConfig]] = {}


def register_variant(fn: Callable[[], CellSAMConfig]) -> Callable[[], CellSAMConfig]:
    """Decorator: register ``fn`` under its function name."""
    if fn.__name__ in _VARIANTS:
        raise ValueError(f"variant {fn.__name__!r} registered twice")
    _VARIANTS[fn.__name__] = fn
    return fn


def list_variants() -> list[str]:
    """Names of all registered architecture variants."""
    return sorted(_VARIANTS)


def get_config(name: str) -> CellSAMConfig:
    """Config of the variant ``name``; unknown names raise ``KeyError`` listing the choices."""
    try:
        return _VARIANTS[name]()
    except KeyError:
        raise KeyError(f"unknown model variant {name!r}; choose one of {list_variants()}") from None


def _paper_cellfinder() -> CellFinderConfig:
    return CellFinderConfig()  # the defaults are the paper's configuration


@register_variant
def vit_b() -> CellSAMConfig:
    """The paper's model: SAM ViT-B (1024 input, patch 16, 768 wide, 12 deep)."""
    return CellSAMConfig(cellfinder=_paper_cellfinder())


@register_variant
def vit_l() -> CellSAMConfig:
    """SAM ViT-L trunk with the paper's CellFinder."""
    enc = EncoderConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))
    return CellSAMConfig(encoder=enc, cellfinder=_paper_cellfinder())


@register_variant
def vit_h() -> CellSAMConfig:
    """SAM ViT-H trunk with the paper's CellFinder."""
    enc = EncoderConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))
    return CellSAMConfig(encoder=enc, cellfinder=_paper_cellfinder())


@register_variant
def vit_tiny() -> CellSAMConfig:
    """A very small model for unit tests: 64-pixel input, 2 blocks, width 32."""
    enc = EncoderConfig(
        img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, out_chans=32,
        window_size=4, global_attn_indexes=(1,),
    )
    dec = MaskDecoderConfig(transformer_mlp_dim=64, transformer_num_heads=2, iou_head_hidden_dim=32)
    cf = CellFinderConfig(
        d_model=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0,
        num_query_position=16, spatial_prior="grid",
    )
    return CellSAMConfig(encoder=enc, mask_decoder=dec, cellfinder=cf, tile_size=64)


@register_variant
def vit_cpu() -> CellSAMConfig:
    """The CPU-trainable model we ship: 256-pixel tiles at native resolution, patch 8.

    Windowed attention only: one global block over 4096 tokens costs 3x the rest of the
    encoder on the 2-core CPU (measured), and cells are local objects; the CellFinder's
    RCDA encoder adds image-wide context. ``pos_scale=32`` (one sine cycle per token of the
    32 x 32 grid): with Anchor DETR's 1 cycle per image, queries attend almost uniformly and the
    detector did not learn on dense small cells (measured: overfitting 4 real tiles, focal loss
    0.40 -> 0.15 after 150 steps with the sharper encoding). ``query_content="features"``: queries
    start from the encoder memory at their anchor; after 750 steps from scratch the detector scored
    cells locally but all queries still shared one box size, and the features let each query see its
    anchor from the first decoder layer (measured on 3 training tiles after 150 more steps: mean score
    near a cell centre 0.24 vs 0.04 elsewhere, against 0.20 vs 0.06 without).
    """
    enc = EncoderConfig(
        img_size=256, patch_size=8, embed_dim=128, depth=4, num_heads=4, out_chans=128,
        window_size=16, global_attn_indexes=(),
    )
    dec = MaskDecoderConfig(transformer_mlp_dim=512, transformer_num_heads=4, iou_head_hidden_dim=128)
    cf = CellFinderConfig(
        d_model=128, nheads=4, enc_layers=1, dec_layers=3, dim_feedforward=512, dropout=0.0,
        num_query_position=576, spatial_prior="grid", num_classes=1, pos_scale=32.0, query_content="features",
    )
    return CellSAMConfig(encoder=enc, mask_decoder=dec, cellfinder=cf, tile_size=256)


@register_variant
def conv_cpu() -> CellSAMConfig:
    """The CPU-trainable default from v3 on: a convolutional multi-scale encoder + the dense CellFinder.

    256-pixel tiles at native resolution. Residual stages at strides 2-32 (widths 32-256) and a
    top-down path to stride 4 feed a CenterNet head (one heatmap peak per cell, log-space box size:
    cells ~4 px to ~200 px wide); a SAM-style neck gives the mask decoder its 32 x 32 x 128 embedding,
    the same as ``vit_cpu``'s (its decoder sizes too). Dense, per-pixel supervision on a conv net is
    what lets Cellpose, StarDist and InstanSeg learn from a few hundred images on a small budget; the
    Anchor-DETR CellFinder on ``vit_cpu`` did not (benchmarks/detector_study.md). From v4 on it has a
    size model (``size_head``: the cell diameter from the encoder's features, fitted by a "size" stage)
    for ``segment(diameter="auto")``; v3's weights have none.
    """
    enc = EncoderConfig(img_size=256, patch_size=8, embed_dim=64, depth=0, num_heads=1, out_chans=128,
                        window_size=0, global_attn_indexes=())
    dec = MaskDecoderConfig(transformer_mlp_dim=512, transformer_num_heads=4, iou_head_hidden_dim=128)
    return CellSAMConfig(encoder=enc, mask_decoder=dec, tile_size=256, encoder_kind="conv", detector_kind="dense",
                         size_head=True)


@register_variant
def conv_tiny() -> CellSAMConfig:
    """A very small conv + dense model for unit tests: 64-pixel input, widths 8-32."""
    enc = EncoderConfig(img_size=64, patch_size=8, embed_dim=8, depth=0, num_heads=1, out_chans=32,
                        window_size=0, global_attn_indexes=())
    dec = MaskDecoderConfig(transformer_mlp_dim=64, transformer_num_heads=2, iou_head_hidden_dim=32)
    conv = ConvEncoderConfig(widths=(8, 16, 16, 32, 32), blocks=(1, 1, 1, 1, 1), decoder_widths=(16, 16, 16))
    return CellSAMConfig(encoder=enc, mask_decoder=dec, tile_size=64, encoder_kind="conv", detector_kind="dense",
                         conv_encoder=conv)


@dataclass(frozen=True)
class WeightsRecord:
    """A named, versioned checkpoint that can be downloaded and verified."""

    name: str  # "variant.tag", e.g. "cellsam_cpu.v2"
    variant: str
    url: str  # http(s):// or file:// URL, or "package:<relative path>" for bundled weights
    sha256: str
    version: str
    description: str = ""
    license: str = ""


_WEIGHTS: dict[str, WeightsRecord] = {}
_ALIASES: dict[str, str] = {}


def register_weights(record: WeightsRecord, *, aliases: tuple[str, ...] = ()) -> None:
    """Add ``record`` (and optional alias names such as ``"default"``) to the registry."""
    if record.name in _WEIGHTS:
        raise ValueError(f"weights {record.name!r} registered twice")
    _WEIGHTS[record.name] = record
    for alias in aliases:
        _ALIASES[alias] = record.name


def list_weights() -> list[str]:
    """Names (and aliases) of all registered weights."""
    return sorted(set(_WEIGHTS) | set(_ALIASES))


def get_weights(name: str) -> WeightsRecord:
    """Weights record for ``name`` or an alias; unknown names raise ``KeyError``."""
    key = _ALIASES.get(name, name)
    try:
        return _WEIGHTS[key]
    except KeyError:
        raise KeyError(f"unknown weights {name!r}; choose one of {list_weights()}") from None


# The shipped default model: trained from random weights on the 2-core CPU by the one command of
# configs/cpu_v13.yaml (cellsam/pretrained/; model card cellsam_cpu_v13.md). v1-v12 are in the git history
# (v3's to v12's cards: benchmarks/training/v3/ to v12/). Registering a record is pure data: nothing is read
# or downloaded until load_model("default") is called.
register_weights(
    WeightsRecord(
        name="cellsam_cpu.v13",
        variant="conv_cpu",
        url="package:pretrained/cellsam_cpu_v13.safetensors",
        sha256="403cfafe5bb756d54f89b69c356072e2be667a8596abfbf9e770753cc424ca69",
        version="v13",
        description="conv_cpu (conv encoder + dense CellFinder with TTFNet targets + size model) trained from "
                    "random weights on DSB 2018, DeepCell 1.0 and MoNuSeg (2-core CPU, recipe 2.43 h); stained "
                    "bright-field pictures as their hematoxylin channel",
        license="Apache-2.0 weights; trained on MoNuSeg (CC BY-NC-SA 4.0): non-commercial use",
    ),
    aliases=("default",),
)
