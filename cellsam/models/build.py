"""Build a :class:`~cellsam.models.cellsam.CellSAM` from a config or a variant name (no I/O)."""

from __future__ import annotations

from cellsam.config import CellSAMConfig
from cellsam.models.cellfinder import CellFinder
from cellsam.models.cellsam import CellSAM
from cellsam.models.conv_encoder import ConvEncoder
from cellsam.models.dense_finder import DenseCellFinder
from cellsam.models.image_encoder import ImageEncoderViT
from cellsam.models.sam_parts import build_sam_parts
from cellsam.models.size_head import SizeHead
from cellsam.registry import get_config


def build_model(cfg: CellSAMConfig | str) -> CellSAM:
    """A randomly initialised CellSAM for ``cfg`` (a config or a registered variant name)."""
    if isinstance(cfg, str):
        cfg = get_config(cfg)
    if not isinstance(cfg, CellSAMConfig):
        raise TypeError(f"expected a CellSAMConfig or variant name, got {type(cfg).__name__}")
    image_encoder, prompt_encoder, mask_decoder = build_sam_parts(cfg)
    trunk_chans = image_encoder.trunk_chans if isinstance(image_encoder, ConvEncoder) else cfg.encoder.embed_dim
    cellfinder: CellFinder | DenseCellFinder
    if cfg.detector_kind == "dense":
        if cfg.encoder_kind != "conv" and cfg.dense_finder.stride != cfg.encoder.patch_size:
            raise ValueError(f"the dense CellFinder on a ViT reads its token grid: dense_finder.stride must be the "
                             f"patch size {cfg.encoder.patch_size} (the conv encoder's trunk is at stride 4)")
        cellfinder = DenseCellFinder(cfg.dense_finder, in_channels=trunk_chans)
    else:
        cellfinder = CellFinder(cfg.cellfinder, in_channels=trunk_chans)
    detector_trunk = ImageEncoderViT(cfg.encoder) if cfg.separate_detector_trunk else None
    size_head = SizeHead(image_encoder.size_feature_chans) if cfg.size_head and isinstance(image_encoder, ConvEncoder) \
        else None
    return CellSAM(
        cfg,
        image_encoder=image_encoder,
        cellfinder=cellfinder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        detector_trunk=detector_trunk,
        size_head=size_head,
    )
