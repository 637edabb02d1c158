"""SAM's mask decoder: prompt tokens + image embedding -> mask logits and IoU predictions.

Semantics and parameter names equal Meta's ``segment_anything.modeling.MaskDecoder``. One image
embedding (1, D, h, w) is shared by all N prompts through a broadcast view instead of a copy
per prompt.

Windowed masks (an inference option): after the two-way transformer, SAM's output upscaling (two
stride-2 2x2 transposed convolutions, a per-pixel LayerNorm, GELUs) and the hypernetwork product are
local: each token of the (h, w) grid alone gives its 4 x 4 block of the (4h, 4w) logits. So a mask
needed only near its prompt can be computed on a window of tokens, with the same values there, and the
rest filled with :data:`WINDOW_FILL`.

Local decoding (``local=True``, an inference option of models that set
``InferenceConfig.local_decoding``): the two-way transformer itself sees only the window's tokens, so
a prompt's cost no longer grows with the image grid. Unlike the windowed upscaling this changes the
values (attention is restricted to the window), so it is measured per model before it is switched on.
"""

from __future__ import annotations

import torch
from torch import nn

from cellsam.models.common import MLP, LayerNorm2d

WINDOW_FILL = -20.0
"""Logit of the low-res pixels outside a prompt's window (sigmoid ~ 2e-9: background)."""


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
        window: tuple[torch.Tensor, int] | None = None,
        local: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode N prompts against one image.

        Args:
            image_embeddings: (1, D, h, w) shared by all prompts, or (N, D, h, w).
            image_pe: (1, D, h, w) positional encoding (``PromptEncoder.get_dense_pe()``).
            sparse_prompt_embeddings: (N, T, D).
            dense_prompt_embeddings: (N, D, h, w) (or (1, D, h, w)).
            multimask_output: return masks 1..M (M = num_multimask_outputs) if True, else mask 0.
            window: ``(origins, k)``: compute prompt i's masks only on the k x k tokens from
                ``origins[i]`` = (row, col) (a (N, 2) integer tensor, windows inside the grid); the
                logits elsewhere are :data:`WINDOW_FILL`. None: the whole grid (SAM).
            local: with ``window``, the transformer attends to the window's tokens only (see the
                module docstring); False: to the whole grid, the window limits the upscaling only.

        Returns:
            masks: (N, M or 1, 4h, 4w) logits; iou_pred: (N, M or 1).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, window=window,
            local=local,
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
        window: tuple[torch.Tensor, int] | None = None,
        local: bool = False,
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
        if window is not None and local:  # the transformer sees each prompt's window only
            src = _gather_windows(src.flatten(2).transpose(1, 2), window, (h, w))  # (N, D, k, k)
            pos_src = _gather_windows(pos_src.flatten(2).transpose(1, 2), window, (h, w))
        hs, src_tokens = self.transformer(src, pos_src, tokens)
        if window is not None and local:
            src = src_tokens.transpose(1, 2).reshape(n, c, window[1], window[1])
        elif window is None:
            src = src_tokens.transpose(1, 2).reshape(n, c, h, w)
        else:
            src = _gather_windows(src_tokens, window, (h, w))  # (N, D, k, k)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        upscaled = self.output_upscaling(src)  # (N, D/8, 4h, 4w), or (N, D/8, 4k, 4k)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (N, K, D/8)
        _, cu, hu, wu = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(n, cu, hu * wu)).reshape(n, -1, hu, wu)
        if window is not None:
            masks = _paste_windows(masks, window[0], (4 * h, 4 * w))
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred


def _check_window(window: tuple[torch.Tensor, int], n: int, grid: tuple[int, int]) -> None:
    origins, k = window
    if origins.shape != (n, 2) or not 1 <= k <= min(grid):
        raise ValueError(f"window: origins must be ({n}, 2) and 1 <= k <= {min(grid)}, got "
                         f"{tuple(origins.shape)}, k={k}")
    if n and (int(origins.min()) < 0 or int(origins[:, 0].max()) + k > grid[0]
              or int(origins[:, 1].max()) + k > grid[1]):
        raise ValueError(f"window: every k x k window (k={k}) must lie inside the {grid[0]}x{grid[1]} grid")


def _gather_windows(src_tokens: torch.Tensor, window: tuple[torch.Tensor, int], grid: tuple[int, int]) -> torch.Tensor:
    """(N, h*w, D) tokens -> (N, D, k, k): prompt i's window from ``origins[i]``."""
    origins, k = window
    n, _, d = src_tokens.shape
    _check_window(window, n, grid)
    ar = torch.arange(k, device=src_tokens.device)
    rows = origins[:, :1].to(ar) + ar  # (N, k)
    cols = origins[:, 1:].to(ar) + ar
    flat = (rows[:, :, None] * grid[1] + cols[:, None, :]).reshape(n, k * k)
    picked = torch.gather(src_tokens, 1, flat[:, :, None].expand(n, k * k, d))  # (N, k*k, D)
    return picked.transpose(1, 2).reshape(n, d, k, k)


def _paste_windows(masks: torch.Tensor, origins: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, M, 4k, 4k) window logits -> (N, M, H, W) frames of WINDOW_FILL with each window in place."""
    n, m, kk, _ = masks.shape
    full = masks.new_full((n, m, *size), WINDOW_FILL)
    ar = torch.arange(kk, device=masks.device)
    rows = 4 * origins[:, :1].to(ar) + ar  # (N, 4k) low-res rows of each window
    cols = 4 * origins[:, 1:].to(ar) + ar
    idx_n = torch.arange(n, device=masks.device)[:, None, None]
    full[idx_n, :, rows[:, :, None], cols[:, None, :]] = masks.permute(0, 2, 3, 1)
    return full
