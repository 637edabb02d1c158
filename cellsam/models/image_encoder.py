"""SAM's ViT image encoder (ViTDet-style): windowed + global attention with decomposed
relative positions, an absolute position embedding and a convolutional neck.

Parameter names equal those of Meta's ``segment_anything.modeling.ImageEncoderViT`` so that a
SAM ``image_encoder.*`` state dict loads strictly. Unlike Meta's module, the input size is fixed
(``cfg.img_size``), so neither the position embedding nor the relative-position tables are ever
interpolated, and attention runs through ``F.scaled_dot_product_attention`` with the relative
position bias given as an additive float mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from cellsam.config import EncoderConfig
from cellsam.models.common import LayerNorm2d, MLPBlock

_LN_EPS = 1e-6  # SAM builds its ViT with LayerNorm(eps=1e-6)


class EncoderOutput(NamedTuple):
    """Result of one encoder pass.

    Attributes:
        trunk: (B, C, h, w) tokens after the last ViT block, before the neck (C = embed_dim).
        embedding: (B, D, h, w) neck output (D = out_chans), the SAM image embedding.
    """

    trunk: torch.Tensor
    embedding: torch.Tensor


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, in_chans, S, S) -> (B, h, w, embed_dim)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split (B, H, W, C) tokens into non-overlapping windows, zero-padding H and W up to a
    multiple of ``window_size``.

    Returns:
        windows: (B * nWin, window_size, window_size, C); (Hp, Wp): the padded grid size.
    """
    b, h, w, c = x.shape
    pad_h = (-h) % window_size
    pad_w = (-w) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nWin, ws, ws, C) -> (B, H, W, C), padding removed."""
    hp, wp = padded_hw
    h, w = hw
    b = windows.shape[0] // ((hp // window_size) * (wp // window_size))
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


def _relative_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather ``rel_pos`` (2*size-1, hd) into (size, size, hd): entry [i, j] = rel_pos[i - j + size - 1]."""
    coords = torch.arange(size, device=rel_pos.device)
    index = coords[:, None] - coords[None, :] + (size - 1)
    return rel_pos[index]


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Decomposed relative-position bias of MViTv2, as used by SAM (query and key grids are equal).

    Args:
        q: (B', h*w, hd) unscaled queries (B' = batch * heads).
        rel_pos_h, rel_pos_w: (2h-1, hd), (2w-1, hd) learned tables.
        size: the (h, w) token grid.

    Returns:
        (B', h*w, h*w) additive attention bias: bias[q=(y,x), k=(y',x')] = q.Rh[y-y'] + q.Rw[x-x'].
    """
    h, w = size
    if rel_pos_h.shape[0] != 2 * h - 1 or rel_pos_w.shape[0] != 2 * w - 1:
        raise ValueError(
            f"relative position tables of length {rel_pos_h.shape[0]}, {rel_pos_w.shape[0]} do not fit "
            f"a {h}x{w} grid (expected {2 * h - 1}, {2 * w - 1})"
        )
    table_h = _relative_table(h, rel_pos_h)  # (h, h, hd)
    table_w = _relative_table(w, rel_pos_w)  # (w, w, hd)
    bq = q.shape[0]
    grid_q = q.reshape(bq, h, w, -1)
    rel_h = torch.einsum("byxc,ykc->byxk", grid_q, table_h)  # (B', h, w, h_k)
    rel_w = torch.einsum("byxc,xkc->byxk", grid_q, table_w)  # (B', h, w, w_k)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]  # (B', h, w, h_k, w_k)
    return bias.reshape(bq, h * w, h * w)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) token grid with optional decomposed
    relative positions. ``input_size`` is the grid the relative-position tables are sized for."""

    def __init__(
        self, dim: int, *, num_heads: int, qkv_bias: bool, use_rel_pos: bool, input_size: tuple[int, int]
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        n = h * w
        # (3, B, heads, N, hd)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            flat_q = q.reshape(b * self.num_heads, n, -1)
            bias = decomposed_rel_pos_bias(flat_q, self.rel_pos_h, self.rel_pos_w, (h, w))
            bias = bias.view(b, self.num_heads, n, n).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, hd)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm ViT block; ``window_size > 0`` attends within windows, 0 attends globally."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        use_rel_pos: bool,
        window_size: int,
        grid_size: tuple[int, int],
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        attn_size = grid_size if window_size == 0 else (window_size, window_size)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, use_rel_pos=use_rel_pos, input_size=attn_size
        )
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            hw = (x.shape[1], x.shape[2])
            windows, padded_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded_hw, hw)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """SAM ViT image encoder of a fixed input size ``cfg.img_size``.

    ``forward(x (B, in_chans, S, S)) -> EncoderOutput(trunk (B, C, h, w), embedding (B, D, h, w))``
    with h = w = S / patch_size, C = embed_dim, D = out_chans.
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.img_size % cfg.patch_size != 0:
            raise ValueError(f"img_size {cfg.img_size} must be a multiple of patch_size {cfg.patch_size}")
        if cfg.window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {cfg.window_size}")
        bad = [i for i in cfg.global_attn_indexes if not 0 <= i < cfg.depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} out of range for depth {cfg.depth}")
        self.cfg = cfg
        self.img_size = cfg.img_size
        grid = cfg.embedding_size
        self.patch_embed = PatchEmbed(
            patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim
        )
        self.pos_embed: nn.Parameter | None = None
        if cfg.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                use_rel_pos=cfg.use_rel_pos,
                window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                grid_size=(grid, grid),
            )
            for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode a batch of preprocessed images (B, in_chans, S, S), S = ``cfg.img_size``."""
        trunk = self.forward_trunk(x)
        return EncoderOutput(trunk=trunk, embedding=self.neck(trunk))

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The ViT blocks only (no neck): (B, in_chans, S, S) -> (B, embed_dim, h, w)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image tensor, got dtype {x.dtype}")
        s, c = self.cfg.img_size, self.cfg.in_chans
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(
                f"ImageEncoderViT expects input of shape (B, {c}, {s}, {s}); got {tuple(x.shape)}. "
                "Resize or pad images to the encoder's img_size first."
            )
        tokens = self.patch_embed(x)  # (B, h, w, C)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return tokens.permute(0, 3, 1, 2)  # (B, C, h, w)
