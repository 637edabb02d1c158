"""The reference CellSAM design, rebuilt from Meta's ``segment_anything`` with OUR model's weights.

Structure of the official CellSAM inference (vanvalenlab/cellSAM ``sam_inference.py``), reproduced
for timing only (our own code; random or trained weights both work):

1. the 512 tile is resized to the encoder's 1024 input;
2. SAM's ``ImageEncoderViT`` computes the image embedding (encoder pass 1);
3. CellFinder runs on the trunk of a *second* ViT of its own (patch embedding + blocks, no neck;
   encoder pass 2; here a copy with the same weights) followed by the Anchor-DETR transformer
   (our :class:`~cellsam.models.cellfinder.CellFinder`, the same module in both pipelines);
4. one prompt-encoder + mask-decoder call per box, in a Python loop;
5. per box: ``Sam.postprocess_masks`` to the full tile, sigmoid threshold, keep the largest object
   (all on full-tile masks);
6. labels: the N full-tile masks are stacked and merged by maximum of (mask * index).

The weights are copied strictly from our model (the SAM parts share Meta's parameter names), so
both pipelines compute the same function; :func:`parity_check` verifies that identical boxes give
identical masks between our batched decoder and this per-box loop.
"""

from __future__ import annotations

import copy
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from cellsam.bench.pipeline import Scene, clip_logits_to_boxes
from cellsam.bench.timing import PeakMemory, StageTimer, merge_peaks, summarize, synchronize

REF_STAGES = ("read", "normalise", "tiling", "encoder", "cellfinder", "mask_decoder", "postprocess", "merge")


def _meta_modules(cfg: Any) -> nn.Module:
    """Meta's ``Sam`` with the hyper-parameters of one of our configs (random weights)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    enc, dec = cfg.encoder, cfg.mask_decoder
    grid = enc.embedding_size
    image_encoder = ImageEncoderViT(
        img_size=enc.img_size, patch_size=enc.patch_size, in_chans=enc.in_chans, embed_dim=enc.embed_dim,
        depth=enc.depth, num_heads=enc.num_heads, mlp_ratio=enc.mlp_ratio, out_chans=enc.out_chans,
        qkv_bias=enc.qkv_bias, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos=enc.use_abs_pos,
        use_rel_pos=enc.use_rel_pos, window_size=enc.window_size,
        global_attn_indexes=tuple(enc.global_attn_indexes),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=enc.out_chans, image_embedding_size=(grid, grid),
        input_image_size=(enc.img_size, enc.img_size), mask_in_chans=cfg.prompt_encoder.mask_in_chans,
    )
    transformer = TwoWayTransformer(
        depth=dec.transformer_depth, embedding_dim=enc.out_chans, mlp_dim=dec.transformer_mlp_dim,
        num_heads=dec.transformer_num_heads, attention_downsample_rate=dec.attention_downsample_rate,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=enc.out_chans, transformer=transformer, num_multimask_outputs=dec.num_multimask_outputs,
        iou_head_depth=dec.iou_head_depth, iou_head_hidden_dim=dec.iou_head_hidden_dim,
    )
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
               pixel_mean=list(cfg.pixel_mean), pixel_std=list(cfg.pixel_std))


def keep_largest_object(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> the largest 4-connected component (as the reference does, on the full tile)."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(counts.argmax())


class ReferencePipeline:
    """The reference structure around our model's weights (see the module docstring).

    Attributes:
        sam: Meta's ``Sam`` holding copies of our encoder / prompt encoder / mask decoder weights.
        detector_trunk: a second Meta ``ImageEncoderViT`` (same weights) whose trunk feeds CellFinder.
        counts: ``{"encoder_passes", "decoder_calls"}`` since the last :meth:`reset_counts`.
    """

    def __init__(self, net: Any) -> None:
        from cellsam.weights import load_state_dict_strict

        cfg = net.cfg
        if getattr(cfg, "separate_detector_trunk", False):
            raise ValueError("the reference pipeline is built from models with one shared encoder")
        dev = next(net.parameters()).device
        self.sam = _meta_modules(cfg)
        for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
            sd = {k: v.detach().clone() for k, v in getattr(net, part).state_dict().items()}
            load_state_dict_strict(getattr(self.sam, part), sd, source=f"our {part} -> segment_anything")
        self.sam = self.sam.to(dev).eval()
        self.detector_trunk = copy.deepcopy(self.sam.image_encoder).eval()
        self.cellfinder = net.cellfinder
        self.side, self.tile_size, self.device = int(cfg.encoder.img_size), int(cfg.tile_size), dev
        self.counts = {"encoder_passes": 0, "decoder_calls": 0}
        for enc in (self.sam.image_encoder, self.detector_trunk):
            enc.patch_embed.register_forward_hook(lambda *_: self._count("encoder_passes"))
        self.sam.mask_decoder.register_forward_hook(lambda *_: self._count("decoder_calls"))

    def _count(self, key: str) -> None:
        self.counts[key] += 1

    def reset_counts(self) -> None:
        self.counts = {"encoder_passes": 0, "decoder_calls": 0}

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(1,3,S,S) preprocessed -> (1,C,h,w) trunk of the detector's own ViT (no neck)."""
        enc = self.detector_trunk
        t = enc.patch_embed(x)
        if enc.pos_embed is not None:
            t = t + enc.pos_embed
        for blk in enc.blocks:
            t = blk(t)
        return t.permute(0, 3, 1, 2)

    def _to_input(self, tile: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(tile, np.float32))[None].to(self.device)
        if x.shape[-1] != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False).clamp_(0, 1)
        return x

    def decode_one(self, embedding: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """One mask-decoder call for one (4,) xyxy box in pixels of S -> (1,1,r,r) low-res logits."""
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=box.view(1, 4), masks=None)
        lo, _ = self.sam.mask_decoder(
            image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        return lo

    def upscale(self, low_res: torch.Tensor, tile_side: int) -> torch.Tensor:
        """(1,1,r,r) -> (1,1,T,T) logits via ``Sam.postprocess_masks`` (S, crop, then the tile size)."""
        return self.sam.postprocess_masks(low_res, (self.side, self.side), (tile_side, tile_side))

    @torch.inference_mode()
    def segment_tile(
        self, tile: np.ndarray, boxes: np.ndarray, timer: StageTimer, *, clip_masks: bool = True,
        mask_threshold: float = 0.5,
    ) -> np.ndarray:
        """Segment one (3, T, T) tile in [0, 1] from ``boxes`` (N, 4) xyxy in tile pixels -> (T, T) labels.

        CellFinder runs (and is timed) but its detections are replaced by ``boxes``.
        """
        t_side = int(tile.shape[-1])
        with timer.stage("tiling"):
            x = self._to_input(tile)
        with timer.stage("encoder"):
            x = (x * 255.0 - self.sam.pixel_mean) / self.sam.pixel_std
            embedding = self.sam.image_encoder(x)
        with timer.stage("cellfinder"):
            out = self.cellfinder(self._trunk(x))
            self.cellfinder.postprocess(out, image_size=self.side, box_threshold=0.4)
        b = torch.as_tensor(boxes, dtype=torch.float32, device=self.device) * (self.side / t_side)
        masks: list[np.ndarray] = []
        for k in range(b.shape[0]):
            with timer.stage("mask_decoder"):
                lo = self.decode_one(embedding, b[k])
                if clip_masks:
                    lo = clip_logits_to_boxes(lo, b[k : k + 1], self.side)
            with timer.stage("postprocess"):
                prob = self.upscale(lo, t_side)[0, 0].sigmoid().float().cpu().numpy()
                masks.append(keep_largest_object(prob > mask_threshold).astype(np.uint8))
        with timer.stage("merge"):
            if not masks:
                return np.zeros((t_side, t_side), np.int32)
            stack = np.stack(masks)
            return (stack * np.arange(1, len(masks) + 1, dtype=np.int32)[:, None, None]).max(axis=0)


def time_reference(
    ref: ReferencePipeline,
    scene: Scene,
    image_path: str | Path,
    *,
    repeats: int = 3,
    warmup: int = 1,
    clip_masks: bool = True,
    model_name: str = "",
) -> dict[str, Any]:
    """Time the reference pipeline (fp32) on a scene of exactly one tile (side = the model's tile size)."""
    from cellsam.inference.preprocess import prepare_image
    from cellsam.io import load_image

    h, w = scene.image.shape
    if (h, w) != (ref.tile_size, ref.tile_size):
        raise ValueError(f"the reference pipeline runs on one {ref.tile_size}-pixel tile; the scene is {h}x{w}")
    timer, mem = StageTimer(ref.device), PeakMemory(ref.device)
    e2e, stages, mems, counts, found = [], [], [], {}, 0
    for i in range(warmup + repeats):
        timer.reset()
        ref.reset_counts()
        mem.reset()
        synchronize(ref.device)
        t0 = time.perf_counter()
        with timer.stage("read"):
            raw = load_image(image_path).data
        with timer.stage("normalise"):
            img = prepare_image(raw)
        labels = ref.segment_tile(img, scene.boxes, timer, clip_masks=clip_masks)
        synchronize(ref.device)
        total = time.perf_counter() - t0
        if i < warmup:
            continue
        per = {s: timer.seconds.get(s, 0.0) for s in REF_STAGES}
        per["other"] = max(total - sum(per.values()), 0.0)
        e2e.append(total)
        stages.append(per)
        mems.append(mem.peak())
        counts, found = dict(ref.counts), int(len(np.unique(labels)) - 1)
    med = float(np.median(e2e))
    return {
        "pipeline": "reference",
        "model": model_name,
        "size": [int(h), int(w)],
        "cells": scene.cells,
        "n_cells": scene.n_cells,
        "precision": "fp32",
        "device": str(ref.device),
        "tile_size": ref.tile_size,
        "model_side": ref.side,
        "clip_masks": bool(clip_masks),
        "repeats": int(repeats),
        "warmup": int(warmup),
        "tiles": 1,
        "end_to_end": summarize(e2e),
        "stages": {s: summarize([p[s] for p in stages]) for s in (*REF_STAGES, "other")},
        "stage_calls": dict(timer.calls),
        "counts": counts,
        "memory": merge_peaks(mems),
        "tiles_per_s": 1.0 / med if med > 0 else float("nan"),
        "megapixels_per_s": h * w / 1e6 / med if med > 0 else float("nan"),
        "cells_found": found,
    }


def _iou_stats(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """a (ours), b (reference): (N, T, T) bool masks -> differing pixels, per-cell IoU (empty-vs-empty
    counts as 1) and the reference's foreground fraction (0 or 1 would make the comparison vacuous)."""
    inter = (a & b).reshape(a.shape[0], -1).sum(1)
    union = (a | b).reshape(a.shape[0], -1).sum(1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {
        "pixels_differing": int((a != b).sum()),
        "foreground_fraction": float(b.mean()) if b.size else 0.0,
        "pixels_total": int(a.size),
        "identical": bool((a == b).all()),
        "min_iou": float(iou.min()) if iou.size else 1.0,
        "mean_iou": float(iou.mean()) if iou.size else 1.0,
    }


def _window_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    inside = torch.isfinite(ours)
    return float((ours[inside] - ref.to(ours)[inside]).abs().max()) if bool(inside.any()) else 0.0


@torch.inference_mode()
def parity_check(
    net: Any, ref: ReferencePipeline, tile: np.ndarray, boxes: np.ndarray, *, precision: str = "fp32",
    decode_chunk: int | None = None,
) -> dict[str, Any]:
    """Masks of our batched decoder vs the reference per-box loop for identical boxes (no clipping).

    Args:
        tile: (3, T, T) prepared tile in [0, 1]; boxes: (N, 4) xyxy in tile pixels.
        precision: of OUR side ("bf16": autocast); the reference always runs fp32.
    Returns:
        ``same_embedding``: both decoders fed the reference's embedding (isolates batching; fp32 only
        on the reference side, ours under ``precision``); ``own_encoders``: each pipeline with its own
        encoder pass; plus ``embedding_max_abs_diff`` and ``logit_max_abs_diff``. Masks are logits > 0.
    """
    from cellsam.inference.runtime import autocast_context

    t_side = int(tile.shape[-1])
    x = ref._to_input(tile)
    x_pre = (x * 255.0 - ref.sam.pixel_mean) / ref.sam.pixel_std
    b = torch.as_tensor(boxes, dtype=torch.float32, device=ref.device) * (ref.side / t_side)
    ref_emb = ref.sam.image_encoder(x_pre)
    ref_logits = torch.cat([ref.upscale(ref.decode_one(ref_emb, b[k]), t_side) for k in range(b.shape[0])]) \
        if b.shape[0] else torch.zeros((0, 1, t_side, t_side), device=ref.device)

    def ours(embedding: torch.Tensor) -> torch.Tensor:
        """Our logits as the pipeline computes them (windowed upscaling), -inf outside each window."""
        from cellsam.inference.upscale import upscale_cells

        chunk = "auto" if decode_chunk is None else decode_chunk
        lo, _ = net.decode(embedding, boxes=b, multimask_output=False, chunk_size=chunk)
        sizes = (net.img_size,) if net.img_size == t_side else (net.img_size, t_side)
        full = torch.full((lo.shape[0], 1, t_side, t_side), float("-inf"))
        for k, win in enumerate(upscale_cells(lo[:, 0], sizes, 0.0, (t_side, t_side))):
            if win is not None:
                y0, x0, w = win
                full[k, 0, y0 : y0 + w.shape[0], x0 : x0 + w.shape[1]] = torch.from_numpy(w)
        return full

    with autocast_context(precision, ref.device):
        same = ours(ref_emb)
        own_emb = net.encode(net.preprocess(x)).embedding
        own = ours(own_emb)
    ref_m = (ref_logits > 0).cpu().numpy()[:, 0]
    return {
        "precision": precision,
        "n_boxes": int(b.shape[0]),
        "tile_size": t_side,
        "embedding_max_abs_diff": float((own_emb.float() - ref_emb).abs().max()),
        # over the cells' windows (outside them our logits are -inf: no pixel there can pass 0)
        "logit_max_abs_diff": _window_diff(same, ref_logits),
        "same_embedding": _iou_stats((same > 0).cpu().numpy()[:, 0], ref_m),
        "own_encoders": _iou_stats((own > 0).cpu().numpy()[:, 0], ref_m),
    }
