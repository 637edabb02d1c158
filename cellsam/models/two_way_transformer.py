"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Parameter names equal Meta's ``segment_anything.modeling.TwoWayTransformer``; attention runs
through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from cellsam.models.common import MLPBlock


def _shared(x: torch.Tensor) -> bool:
    """Whether the (B, N, E) tensor is one row broadcast over the batch (batch stride 0, B > 1).

    Every box prompt on one image starts from the same image tokens; computing on that one row and
    broadcasting the result is exact and saves (B - 1) copies of the work (see :meth:`Attention.forward`).
    """
    return x.shape[0] > 1 and x.stride(0) == 0


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``, computed once for a batch-broadcast ``x``."""
    if _shared(x):
        return layer(x[:1]).expand(x.shape[0], -1, -1)
    return layer(x)


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, computed once when both are batch-broadcast."""
    if _shared(a) and _shared(b):
        return (a[:1] + b[:1]).expand(a.shape)
    return a + b


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if downsample_rate < 1 or self.internal_dim % num_heads != 0:
            raise ValueError(
                f"num_heads {num_heads} must divide the internal width {self.internal_dim} "
                f"(embedding_dim {embedding_dim} / downsample_rate {downsample_rate})"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, heads, N, hd)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, E), k and v (B, Nk, E) -> (B, Nq, E)."""
        out = F.scaled_dot_product_attention(
            self._split_heads(_linear(self.q_proj, q)),
            self._split_heads(_linear(self.k_proj, k)),
            self._split_heads(_linear(self.v_proj, v)),
        )  # (B, heads, Nq, hd)
        b, _, nq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Nq, E), keys (B, Nk, E) with their positional encodings -> updated pair."""
        if self.skip_first_layer_pe:
            # the first layer replaces the tokens by their self-attention (no residual, no PE)
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = _add(keys, key_pe)  # in the first layer the same for every prompt: computed once
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Decoder in which prompt tokens attend to the image embedding and vice versa.

    Args:
        depth: number of :class:`TwoWayAttentionBlock` layers.
        embedding_dim: E, width of tokens and image embedding.
        num_heads: attention heads (must divide E / attention_downsample_rate).
        mlp_dim: hidden width of the token MLP.
        attention_downsample_rate: width reduction inside the cross-attentions.
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder.

        Args:
            image_embedding: (B, E, h, w).
            image_pe: (B, E, h, w) positional encoding of the image (a broadcast view is fine).
            point_embedding: (B, T, E) prompt + output tokens (also used as their positional encoding).

        Returns:
            queries (B, T, E) and keys (B, h*w, E), the processed tokens and image.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)  # (B, hw, E)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, point_embedding, key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
