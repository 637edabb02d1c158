"""SAM's prompt encoder: points, boxes and low-resolution masks to sparse and dense embeddings.

Semantics and parameter names equal Meta's ``segment_anything.modeling.PromptEncoder``.
Coordinates are (x, y) pixels in the encoder input frame (``input_image_size``).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from cellsam.models.common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) in [0, 1]^2 with a fixed random Gaussian frequency matrix."""

    positional_encoding_gaussian_matrix: torch.Tensor  # (2, num_pos_feats) buffer

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) normalised (x, y) in [0, 1] -> (..., 2 * num_pos_feats) [sin, cos] features."""
        matrix = self.positional_encoding_gaussian_matrix
        proj = (2 * coords.to(matrix.dtype) - 1) @ matrix
        proj = 2 * math.pi * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the pixel centres of an (h, w) grid: (2 * num_pos_feats, h, w)."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=matrix.device, dtype=matrix.dtype) + 0.5) / h
        xs = (torch.arange(w, device=matrix.device, dtype=matrix.dtype) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)  # (h, w, 2)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(..., 2) (x, y) pixel coordinates in an (H, W) image -> (..., 2 * num_pos_feats)."""
        h, w = image_size
        if not coords.is_floating_point():
            coords = coords.float()
        normalised = torch.stack([coords[..., 0] / w, coords[..., 1] / h], dim=-1)
        return self._encode(normalised)


class PromptEncoder(nn.Module):
    """Encode point, box and mask prompts for the SAM mask decoder.

    Args:
        embed_dim: D, the width of prompt and image embeddings.
        image_embedding_size: (h, w) of the image embedding.
        input_image_size: (H, W) of the encoder input, the frame of point and box coordinates.
        mask_in_chans: hidden channels of the mask downscaling convolutions.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
    ) -> None:
        super().__init__()
        if embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be even, got {embed_dim}")
        if mask_in_chans % 4 != 0:
            raise ValueError(f"mask_in_chans must be a multiple of 4, got {mask_in_chans}")
        self.embed_dim = embed_dim
        h, w = image_embedding_size
        self.image_embedding_size = (h, w)
        h, w = input_image_size
        self.input_image_size = (h, w)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left, 3: box bottom-right
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid: (1, D, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _point_embedding(self, kind: int) -> torch.Tensor:
        """(1, D) learned embedding of point kind ``kind`` (0 negative, 1 positive, 2/3 box corners)."""
        return cast(nn.Embedding, self.point_embeddings[kind]).weight

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor, *, pad: bool) -> torch.Tensor:
        """(N, P, 2) xy pixels, (N, P) labels -> (N, P (+1 if pad), D).

        Label 1 = positive, 0 = negative, -1 = padding (not a point); other labels get only the
        positional encoding, as in SAM.
        """
        coords = coords + 0.5  # pixel centres
        if pad:
            n = coords.shape[0]
            coords = torch.cat([coords, coords.new_zeros(n, 1, 2)], dim=1)
            labels = torch.cat([labels, labels.new_full((n, 1), -1)], dim=1)
        pe = self.pe_layer.forward_with_coords(coords, self.input_image_size)
        lab = labels[..., None]
        pe = torch.where(lab == -1, torch.zeros_like(pe), pe)
        pe = pe + (lab == -1).to(pe.dtype) * self.not_a_point_embed.weight
        pe = pe + (lab == 0).to(pe.dtype) * self._point_embedding(0)
        pe = pe + (lab == 1).to(pe.dtype) * self._point_embedding(1)
        return pe

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4) xyxy pixels -> (N, 2, D) corner embeddings."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self._point_embedding(2), self._point_embedding(3)], dim=0)
        return pe + corner_embed

    def _batch_size(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        sizes: dict[str, int] = {}
        if points is not None:
            if not isinstance(points, (tuple, list)) or len(points) != 2:
                raise TypeError("points must be a (coords, labels) pair of tensors")
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 2:
                raise ValueError(f"point coords must have shape (N, P, 2), got {tuple(coords.shape)}")
            if labels.shape != coords.shape[:2]:
                raise ValueError(
                    f"point labels must have shape {tuple(coords.shape[:2])}, got {tuple(labels.shape)}"
                )
            sizes["points"] = coords.shape[0]
        if boxes is not None:
            if not (boxes.ndim == 2 or (boxes.ndim == 3 and boxes.shape[1] == 1)) or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must have shape (N, 4) xyxy, got {tuple(boxes.shape)}")
            sizes["boxes"] = boxes.shape[0]
        if masks is not None:
            expected = (1, *self.mask_input_size)
            if masks.ndim != 4 or tuple(masks.shape[1:]) != expected:
                raise ValueError(f"masks must have shape (N, {', '.join(map(str, expected))}), "
                                 f"got {tuple(masks.shape)}")
            sizes["masks"] = masks.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes disagree: {sizes}")
        return next(iter(sizes.values()), 1)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts for N objects.

        Args:
            points: ((N, P, 2) xy pixels, (N, P) labels) or None.
            boxes: (N, 4) xyxy pixels or None.
            masks: (N, 1, 4h, 4w) mask logits or None.

        Returns:
            sparse: (N, T, D) with T = P (+1 padding point when there is no box) + 2 per box.
            dense: (N, D, h, w); the learned "no mask" embedding (a broadcast view) if masks is None.
        """
        n = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        parts = [weight.new_empty(n, 0, self.embed_dim)]
        if points is not None:
            parts.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        return sparse, dense
