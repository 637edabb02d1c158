"""SAM's mask decoder: prompt tokens + image embedding -> mask logits and IoU predictions.

Semantics and parameter names equal Meta's ``segment_anything.modeling.MaskDecoder``. One image
embedding (1, D, h, w) is shared by all N prompts through a broadcast view instead of a copy
per prompt.
"""

from __future__ import annotations

import torch
from torch import nn

from cellsam.models.common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    """Predict ``num_multimask_outputs + 1`` masks per prompt with a two-way transformer.

    Args:
        transformer_dim: D, width of the tokens and of the image embedding.
        transformer: a module ``(src (N,D,h,w), pos (N,D,h,w), tokens (N,T,D)) -> (tokens, src (N,hw,D))``,
            normally :class:`~cellsam.models.two_way_transformer.TwoWayTransformer`.
        num_multimask_outputs: masks returned when ``multimask_output`` is True.
        iou_head_depth, iou_head_hidden_dim: the IoU-prediction MLP.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        if transformer_dim % 8 != 0:
            raise ValueError(f"transformer_dim must be a multiple of 8, got {transformer_dim}")
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode N prompts against one image.

        Args:
            image_embeddings: (1, D, h, w) shared by all prompts, or (N, D, h, w).
            image_pe: (1, D, h, w) positional encoding (``PromptEncoder.get_dense_pe()``).
            sparse_prompt_embeddings: (N, T, D).
            dense_prompt_embeddings: (N, D, h, w) (or (1, D, h, w)).
            multimask_output: return masks 1..M (M = num_multimask_outputs) if True, else mask 0.

        Returns:
            masks: (N, M or 1, 4h, 4w) logits; iou_pred: (N, M or 1).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def _check_shapes(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
    ) -> int:
        if sparse.ndim != 3 or sparse.shape[-1] != self.transformer_dim:
            raise ValueError(
                f"sparse_prompt_embeddings must be (N, T, {self.transformer_dim}), got {tuple(sparse.shape)}"
            )
        n = sparse.shape[0]
        if image_embeddings.ndim != 4 or image_embeddings.shape[1] != self.transformer_dim:
            raise ValueError(
                f"image_embeddings must be (1 or N, {self.transformer_dim}, h, w), "
                f"got {tuple(image_embeddings.shape)}"
            )
        if image_embeddings.shape[0] not in (1, n):
            raise ValueError(
                f"image_embeddings batch {image_embeddings.shape[0]} must be 1 or the number of prompts {n}"
            )
        grid = tuple(image_embeddings.shape[1:])
        if image_pe.ndim != 4 or image_pe.shape[0] != 1 or tuple(image_pe.shape[1:]) != grid:
            raise ValueError(
                f"image_pe must be (1, {', '.join(map(str, grid))}), got {tuple(image_pe.shape)}"
            )
        if dense.ndim != 4 or dense.shape[0] not in (1, n) or tuple(dense.shape[1:]) != grid:
            raise ValueError(
                f"dense_prompt_embeddings must be (N, {', '.join(map(str, grid))}), got {tuple(dense.shape)}"
            )
        return n

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks (N, M+1, 4h, 4w) and IoU predictions (N, M+1); see ``forward``."""
        n = self._check_shapes(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1+K, D)
        output_tokens = output_tokens.unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)  # (N, 1+K+T, D)

        _, c, h, w = image_embeddings.shape
        if dense_prompt_embeddings.shape[0] > 1 and dense_prompt_embeddings.stride(0) == 0:
            dense_prompt_embeddings = dense_prompt_embeddings[:1]  # one "no mask" embedding for all prompts
        # a batch-broadcast view when the dense prompt is shared: the transformer's first layer then
        # computes the image side once for all prompts
        src = (image_embeddings + dense_prompt_embeddings).expand(n, c, h, w)
        pos_src = image_pe.expand(n, c, h, w)
        hs, src_tokens = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        src = src_tokens.transpose(1, 2).reshape(n, c, h, w)
        upscaled = self.output_upscaling(src)  # (N, D/8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (N, K, D/8)
        _, cu, hu, wu = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(n, cu, hu * wu)).reshape(n, -1, hu, wu)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred
