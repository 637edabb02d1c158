"""Anchor-DETR transformer with row-column decoupled attention (RCDA), single feature level.

Anchor DETR (Wang et al., AAAI 2022): object queries are *anchor points* (x, y) in [0, 1]
combined with a few *pattern* embeddings (Q = num_pattern * num_position queries). The encoder
is 6 RCDA self-attention layers over the (H, W) feature map; each of the 6 post-norm decoder
layers runs query self-attention -> RCDA cross-attention -> FFN. One class head and one box head
are shared by all decoder layers; the box centre is predicted as a delta on the anchor in
inverse-sigmoid space, width and height are absolute. Anchors are not refined between layers.

Parameter names follow Anchor DETR's ``models/transformer.py`` (``encoder_layers.{i}``,
``decoder_layers.{i}``, ``pattern``, ``position``, ``adapt_pos2d``, ``adapt_pos1d``, ``class_embed``,
``bbox_embed.layers.{j}``; RCDA keeps nn.MultiheadAttention's ``in_proj_weight`` (5C x C, packed
q_row, q_col, k_row, k_col, v), ``in_proj_bias`` and ``out_proj``). The one difference: Anchor DETR
registers the shared heads in a ModuleList six times (``class_embed.{0..5}``), we register each
head once (``class_embed``). ``position`` is an embedding for both spatial priors (for "grid"
it is initialised on the grid and stays learnable). With ``attention_type="nn.MultiheadAttention"``
``adapt_pos1d`` is unused (kept, as in CellSAM's version, so the parameter set does not change).
"""

from __future__ import annotations

import copy
import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellsam.models.position_encoding import pixel_centre_positions, pos2posemb1d, pos2posemb2d

__all__ = ["AnchorDETRTransformer", "MultiheadRCDA", "grid_anchors", "inverse_sigmoid"]

AttentionType = Literal["RCDA", "nn.MultiheadAttention"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x`` clamped to [0, 1] (with ``eps`` guarding log(0))."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def grid_anchors(num_position: int) -> Tensor:
    """Anchor points on an n x n grid of cell centres, n = sqrt(num_position) -> (n*n, 2) (x, y).

    Row-major: anchor ``iy * n + ix`` is ``((ix + 0.5) / n, (iy + 0.5) / n)``.
    """
    n = math.isqrt(num_position)
    if n * n != num_position:
        raise ValueError(f'spatial_prior="grid" needs a square num_query_position, got {num_position}')
    c = pixel_centre_positions(n)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=-1)


class MultiheadRCDA(nn.Module):
    """Row-column decoupled multi-head attention.

    Row keys are averaged over H (W keys), column keys over W (H keys), each with its own
    softmax; the output at a query is sum_{h,w} a_col[h] * a_row[w] * V[h, w]. The shorter edge
    is kept in the intermediate tensor (Nq x min(H, W) x C).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(5 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(5 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _proj(self, x: Tensor, i: int) -> Tensor:
        e = self.embed_dim
        return F.linear(x, self.in_proj_weight[i * e : (i + 1) * e], self.in_proj_bias[i * e : (i + 1) * e])

    def forward(self, query_row: Tensor, query_col: Tensor, key_row: Tensor, key_col: Tensor,
                value: Tensor) -> Tensor:
        """query_row, query_col: (B, L, C); key_row, key_col, value: (B, H, W, C) -> (B, L, C)."""
        b, n_q, c = query_row.shape
        _, h, w, _ = value.shape
        m, d = self.num_heads, c // self.num_heads
        scale = d**-0.5
        # The projection is affine, so averaging before projecting equals projecting then averaging.
        q_row = self._proj(query_row, 0).view(b, n_q, m, d).transpose(1, 2) * scale  # (B, M, L, d)
        q_col = self._proj(query_col, 1).view(b, n_q, m, d).transpose(1, 2) * scale
        k_row = self._proj(key_row.mean(dim=1), 2).view(b, w, m, d).transpose(1, 2)  # (B, M, W, d)
        k_col = self._proj(key_col.mean(dim=2), 3).view(b, h, m, d).transpose(1, 2)  # (B, M, H, d)
        v = self._proj(value, 4).view(b, h, w, m, d).permute(0, 3, 1, 2, 4)  # (B, M, H, W, d)

        p = self.dropout if self.training else 0.0
        a_row = F.dropout(torch.softmax(q_row @ k_row.transpose(-1, -2), dim=-1), p)  # (B, M, L, W)
        a_col = F.dropout(torch.softmax(q_col @ k_col.transpose(-1, -2), dim=-1), p)  # (B, M, L, H)
        if h < w:  # contract W first, keep H (the shorter edge)
            vw = v.transpose(2, 3).reshape(b, m, w, h * d)
            tmp = (a_row @ vw).view(b, m, n_q, h, d)  # (B, M, L, H, d)
            out = (a_col.unsqueeze(-2) @ tmp).squeeze(-2)  # (B, M, L, d)
        else:  # contract H first, keep W
            tmp = (a_col @ v.reshape(b, m, h, w * d)).view(b, m, n_q, w, d)
            out = (a_row.unsqueeze(-2) @ tmp).squeeze(-2)
        return self.out_proj(out.transpose(1, 2).reshape(b, n_q, c))


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be 'relu' or 'gelu', got {name!r}")


class FFN(nn.Module):
    """Post-norm feed-forward block: norm2(x + linear2(act(linear1(x))))."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(x + self.dropout3(self.linear2(self.dropout2(self.activation(self.linear1(x))))))


def _attention(attention_type: str, d_model: int, n_heads: int, dropout: float) -> nn.Module:
    if attention_type == "RCDA":
        return MultiheadRCDA(d_model, n_heads, dropout=dropout)
    if attention_type == "nn.MultiheadAttention":
        return nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
    raise ValueError(f"attention_type must be 'RCDA' or 'nn.MultiheadAttention', got {attention_type!r}")


class EncoderLayer(nn.Module):
    """Spatial self-attention (RCDA or full) + FFN, post-norm, on a channels-last map."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, activation: str, n_heads: int,
                 attention_type: str) -> None:
        super().__init__()
        self.attention_type = attention_type
        self.self_attn = _attention(attention_type, d_model, n_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout, activation)

    def forward(self, src: Tensor, pos: dict[str, Tensor]) -> Tensor:
        """src (B, H, W, C); ``pos`` from :meth:`AnchorDETRTransformer._feature_pos` -> (B, H, W, C)."""
        b, h, w, c = src.shape
        if self.attention_type == "RCDA":
            s_row, s_col = src + pos["row"], src + pos["col"]
            out = self.self_attn(s_row.reshape(b, h * w, c), s_col.reshape(b, h * w, c), s_row, s_col, src)
        else:
            qk = (src + pos["2d"]).reshape(b, h * w, c)
            out = self.self_attn(qk, qk, src.reshape(b, h * w, c), need_weights=False)[0]
        src = self.norm1(src + self.dropout1(out.reshape(b, h, w, c)))
        return self.ffn(src)


class DecoderLayer(nn.Module):
    """Query self-attention -> cross-attention (RCDA or full) to the memory -> FFN, post-norm."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, activation: str, n_heads: int,
                 attention_type: str) -> None:
        super().__init__()
        self.attention_type = attention_type
        self.cross_attn = _attention(attention_type, d_model, n_heads, dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout, activation)

    def forward(self, tgt: Tensor, memory: Tensor, query_pos: dict[str, Tensor],
                pos: dict[str, Tensor]) -> Tensor:
        """tgt (B, Q, C), memory (B, H, W, C); query_pos: "2d", "x", "y" each (Q, C) -> (B, Q, C)."""
        qk = tgt + query_pos["2d"]
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(qk, qk, tgt, need_weights=False)[0]))
        b, h, w, c = memory.shape
        if self.attention_type == "RCDA":
            out = self.cross_attn(tgt + query_pos["x"], tgt + query_pos["y"],
                                  memory + pos["row"], memory + pos["col"], memory)
        else:
            k = (memory + pos["2d"]).reshape(b, h * w, c)
            v = memory.reshape(b, h * w, c)
            out = self.cross_attn(tgt + query_pos["2d"], k, v, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(out))
        return self.ffn(tgt)


class _MLP(nn.Module):
    """Linear layers with ReLU in between (names ``layers.{i}`` as in DETR)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _pos_mlp(d_model: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))


def sample_at(memory: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of a feature map at normalised points.

    Arguments:
        memory: (B, H, W, C) features whose pixel i covers [i/H, (i+1)/H) (centres at (i+0.5)/H).
        points: (Q, 2) (x, y) in [0, 1].
    Returns:
        (B, Q, C); points outside the map are clamped to its border.
    """
    grid = (points * 2 - 1).to(memory.dtype)[None, None].expand(memory.shape[0], 1, -1, -1)  # (B,1,Q,2)
    out = F.grid_sample(memory.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # (B, C, 1, Q)
    return out[:, :, 0].transpose(1, 2)


class AnchorDETRTransformer(nn.Module):
    """Anchor-DETR encoder-decoder with anchor-point queries and shared class/box heads.

    Args (keyword-only): d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
        dropout, activation, num_query_position (anchor points), num_query_pattern, num_classes
        (sigmoid classes), spatial_prior ("learned": uniform(0,1) init; "grid": regular grid init,
        needs a square count), attention_type ("RCDA" or "nn.MultiheadAttention"), prior_prob
        (class bias init -log((1-p)/p)), pos_scale (positions x pos_scale before the sine encodings),
        query_content ("pattern": queries start as their pattern embedding; "features": pattern + the
        encoder memory sampled bilinearly at the query's anchor).
    """

    def __init__(self, *, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.0,
                 activation: str = "relu", num_query_position: int = 300, num_query_pattern: int = 3,
                 num_classes: int = 2, spatial_prior: str = "learned", attention_type: str = "RCDA",
                 prior_prob: float = 0.01, pos_scale: float = 1.0, query_content: str = "pattern") -> None:
        super().__init__()
        if d_model <= 0 or d_model % 4:
            raise ValueError(f"d_model must be a positive multiple of 4, got {d_model}")
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        counts = {"num_decoder_layers": num_decoder_layers, "num_query_position": num_query_position,
                  "num_query_pattern": num_query_pattern, "num_classes": num_classes}
        for name, v in counts.items():
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if num_encoder_layers < 0:
            raise ValueError(f"num_encoder_layers must be >= 0, got {num_encoder_layers}")
        if spatial_prior not in ("learned", "grid"):
            raise ValueError(f"spatial_prior must be 'learned' or 'grid', got {spatial_prior!r}")
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        if not pos_scale > 0:
            raise ValueError(f"pos_scale must be > 0, got {pos_scale}")
        if query_content not in ("pattern", "features"):
            raise ValueError(f"query_content must be 'pattern' or 'features', got {query_content!r}")
        self.d_model, self.num_classes, self.pos_scale = d_model, num_classes, float(pos_scale)
        self.query_content = query_content
        self.attention_type = attention_type
        self.num_position, self.num_pattern = num_query_position, num_query_pattern

        enc = EncoderLayer(d_model, dim_feedforward, dropout, activation, nhead, attention_type)
        dec = DecoderLayer(d_model, dim_feedforward, dropout, activation, nhead, attention_type)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(enc) for _ in range(num_encoder_layers))
        self.decoder_layers = nn.ModuleList(copy.deepcopy(dec) for _ in range(num_decoder_layers))
        self.pattern = nn.Embedding(num_query_pattern, d_model)
        self.position = nn.Embedding(num_query_position, 2)
        self.adapt_pos2d = _pos_mlp(d_model)
        self.adapt_pos1d = _pos_mlp(d_model)
        self.class_embed = nn.Linear(d_model, num_classes)
        self.bbox_embed = _MLP(d_model, d_model, 4, 3)

        with torch.no_grad():
            self.class_embed.bias.fill_(-math.log((1 - prior_prob) / prior_prob))
            last = cast(nn.Linear, self.bbox_embed.layers[-1])
            last.weight.zero_()
            last.bias.zero_()
            last.bias[2:] = -2.0  # initial w, h = sigmoid(-2) = 0.119 of the image
            if spatial_prior == "learned":
                self.position.weight.uniform_(0, 1)
            else:
                self.position.weight.copy_(grid_anchors(num_query_position))

    @property
    def num_queries(self) -> int:
        """Q = num_query_pattern * num_query_position."""
        return self.num_pattern * self.num_position

    def anchors(self) -> Tensor:
        """(Q, 2) anchor point (x, y) of each query, in the order of :meth:`forward`'s queries."""
        return self.position.weight.repeat(self.num_pattern, 1)

    def _feature_pos(self, h: int, w: int, device: torch.device) -> dict[str, Tensor]:
        """Adapted position embeddings of the feature-map pixels (batch independent)."""
        ys, xs = pixel_centre_positions(h, device=device), pixel_centre_positions(w, device=device)
        if self.attention_type == "RCDA":
            row = self.adapt_pos1d(pos2posemb1d(xs, num_pos_feats=self.d_model, scale=self.pos_scale))  # (W, C)
            col = self.adapt_pos1d(pos2posemb1d(ys, num_pos_feats=self.d_model, scale=self.pos_scale))  # (H, C)
            return {"row": row[None, None], "col": col[None, :, None]}
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        emb = pos2posemb2d(torch.stack((xx, yy), dim=-1), num_pos_feats=self.d_model // 2, scale=self.pos_scale)
        return {"2d": self.adapt_pos2d(emb)[None]}  # (1, H, W, C)

    def forward(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src: (B, C, H, W) projected features.

        Returns:
            logits (L, B, Q, K) and boxes (L, B, Q, 4) sigmoid cxcywh in [0, 1], one per decoder
            layer L (the last is the final prediction). Query ``p * num_position + n`` uses pattern p
            and anchor n.
        """
        if src.ndim != 4 or src.shape[1] != self.d_model:
            raise ValueError(f"expected features (B, {self.d_model}, H, W), got {tuple(src.shape)}")
        b, _, h, w = src.shape
        pos = self._feature_pos(h, w, src.device)
        memory = src.permute(0, 2, 3, 1)  # (B, H, W, C), channels last through the encoder
        for layer in self.encoder_layers:
            memory = layer(memory, pos)

        ref = self.anchors()  # (Q, 2) anchors (x, y)
        query_pos = {
            "2d": self.adapt_pos2d(pos2posemb2d(ref, num_pos_feats=self.d_model // 2, scale=self.pos_scale)),
            "x": self.adapt_pos1d(pos2posemb1d(ref[:, 0], num_pos_feats=self.d_model, scale=self.pos_scale)),
            "y": self.adapt_pos1d(pos2posemb1d(ref[:, 1], num_pos_feats=self.d_model, scale=self.pos_scale)),
        }
        tgt = self.pattern.weight.repeat_interleave(self.num_position, dim=0)  # (Q, C)
        tgt = tgt.unsqueeze(0).expand(b, -1, -1)
        if self.query_content == "features":
            tgt = tgt + sample_at(memory, ref)
        ref_logit = inverse_sigmoid(ref)

        logits, boxes = [], []
        for layer in self.decoder_layers:
            tgt = layer(tgt, memory, query_pos, pos)
            logits.append(self.class_embed(tgt))
            raw = self.bbox_embed(tgt)
            boxes.append(torch.cat((raw[..., :2] + ref_logit, raw[..., 2:]), dim=-1).sigmoid())
        return torch.stack(logits), torch.stack(boxes)
