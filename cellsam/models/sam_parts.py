"""Build SAM's image encoder, prompt encoder and mask decoder from a :class:`CellSAMConfig`."""

from __future__ import annotations

from cellsam.config import CellSAMConfig
from cellsam.models.conv_encoder import ConvEncoder
from cellsam.models.image_encoder import ImageEncoderViT
from cellsam.models.mask_decoder import MaskDecoder
from cellsam.models.prompt_encoder import PromptEncoder
from cellsam.models.two_way_transformer import TwoWayTransformer


def build_sam_parts(cfg: CellSAMConfig) -> tuple[ImageEncoderViT | ConvEncoder, PromptEncoder, MaskDecoder]:
    """Randomly initialised (image_encoder, prompt_encoder, mask_decoder) wired to ``cfg``'s sizes.

    The prompt/decoder width is ``cfg.encoder.out_chans``, the embedding grid
    ``cfg.encoder.embedding_size`` and the prompt coordinate frame ``cfg.encoder.img_size``.
    """
    enc = cfg.encoder
    dec = cfg.mask_decoder
    width = enc.out_chans
    grid = enc.embedding_size
    image_encoder: ImageEncoderViT | ConvEncoder
    image_encoder = ConvEncoder(enc, cfg.conv_encoder) if cfg.encoder_kind == "conv" else ImageEncoderViT(enc)
    prompt_encoder = PromptEncoder(
        embed_dim=width,
        image_embedding_size=(grid, grid),
        input_image_size=(enc.img_size, enc.img_size),
        mask_in_chans=cfg.prompt_encoder.mask_in_chans,
    )
    transformer = TwoWayTransformer(
        depth=dec.transformer_depth,
        embedding_dim=width,
        mlp_dim=dec.transformer_mlp_dim,
        num_heads=dec.transformer_num_heads,
        attention_downsample_rate=dec.attention_downsample_rate,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=width,
        transformer=transformer,
        num_multimask_outputs=dec.num_multimask_outputs,
        iou_head_depth=dec.iou_head_depth,
        iou_head_hidden_dim=dec.iou_head_hidden_dim,
    )
    return image_encoder, prompt_encoder, mask_decoder
