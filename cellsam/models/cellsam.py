"""CellSAM: the composition root. One encoder pass feeds CellFinder and the SAM mask decoder.

    image (B,3,S,S) in [0,1]
        -> preprocess -> image encoder -> trunk (B,C,h,w) -> CellFinder -> boxes, scores
                                          -> neck  (B,D,h,w) -> PromptEncoder(boxes) + MaskDecoder -> masks
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cellsam.config import CellSAMConfig, FlipTest, flip_test_mode
from cellsam.models.cellfinder import CellFinder
from cellsam.models.conv_encoder import ConvEncoder
from cellsam.models.dense_finder import FLIP_TEST_VIEWS, DenseCellFinder, mean_of_views, unmirror
from cellsam.models.image_encoder import EncoderOutput, ImageEncoderViT
from cellsam.models.mask_decoder import MaskDecoder
from cellsam.models.prompt_encoder import PromptEncoder
from cellsam.models.size_head import SizeHead

Points = tuple[Tensor, Tensor]


class CellSAM(nn.Module):
    """SAM image encoder + CellFinder + SAM prompt encoder and mask decoder.

    Arguments:
        cfg: the architecture (stored with checkpoints).
        image_encoder: the shared encoder (SAM's ViT or the convolutional one); its trunk feeds
            ``cellfinder``, its neck the mask decoder.
        cellfinder: the Anchor-DETR detector on the trunk features, or the dense (CenterNet) one on
            the conv encoder's stride-4 trunk; both give :meth:`postprocess_detections` the same output.
        prompt_encoder, mask_decoder: SAM's heads.
        detector_trunk: only for faithfully imported official checkpoints, whose detector has a
            ViT of its own (``cfg.separate_detector_trunk``); ``None`` for our models.
    """

    pixel_mean: Tensor  # (1,3,1,1) non-persistent buffers, registered in __init__
    pixel_std: Tensor

    def __init__(
        self,
        cfg: CellSAMConfig,
        *,
        image_encoder: ImageEncoderViT | ConvEncoder,
        cellfinder: CellFinder | DenseCellFinder,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        detector_trunk: ImageEncoderViT | None = None,
        size_head: SizeHead | None = None,
    ) -> None:
        super().__init__()
        if cfg.separate_detector_trunk != (detector_trunk is not None):
            raise ValueError("detector_trunk must be given exactly when cfg.separate_detector_trunk is True")
        self.cfg = cfg
        self.image_encoder = image_encoder
        self.cellfinder = cellfinder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.detector_trunk = detector_trunk
        if cfg.size_head != (size_head is not None):
            raise ValueError("size_head must be given exactly when cfg.size_head is True")
        self.size_head = size_head
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ sizes
    @property
    def img_size(self) -> int:
        """Side S of the square image the encoder takes."""
        return self.cfg.encoder.img_size

    @property
    def low_res_size(self) -> int:
        """Side of the mask decoder's low-resolution logits (4 x the token grid)."""
        return 4 * self.cfg.encoder.embedding_size

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    # ------------------------------------------------------------------ encoder
    def preprocess(self, images: Tensor) -> Tensor:
        """(B,3,S,S) in [0,1] -> SAM-normalised (B,3,S,S). Raises on wrong shapes."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images of shape (B, 3, {self.img_size}, {self.img_size}), got {tuple(images.shape)}"
            )
        return (images * 255.0 - self.pixel_mean) / self.pixel_std

    def encode(self, images: Tensor) -> EncoderOutput:
        """One encoder pass over preprocessed images (B,3,S,S)."""
        return self.image_encoder(images)

    @torch.no_grad()
    def predict_diameter(self, images: Tensor) -> Tensor:
        """(B,3,S,S) preprocessed images -> (B,) median cell diameter in pixels of the S x S input,
        from the size model; raises if the model has none or it was never fitted."""
        if self.size_head is None or not self.size_head.fitted or not isinstance(self.image_encoder, ConvEncoder):
            raise ValueError("this model has no fitted size model (cfg.size_head)")
        return self.size_head(self.image_encoder.size_features(images)).exp()

    # ------------------------------------------------------------------ detector
    def detect(self, enc: EncoderOutput, images: Tensor | None = None, *,
               flip_test: FlipTest | bool | None = None) -> dict[str, Any]:
        """Run CellFinder on the trunk features.

        Returns the detector's raw outputs: for Anchor DETR ``pred_logits`` (B,Q,K), ``pred_boxes``
        (B,Q,4) cxcywh in [0,1] of the S x S input and ``aux_outputs``; for the dense CellFinder
        ``heatmap``, ``size`` and ``offset`` maps. :meth:`postprocess_detections` turns either into boxes.
        ``images`` (preprocessed) is needed when the model has a separate detector trunk (imported
        official checkpoints) and for the dense CellFinder's flip test (at inference only): the mean of the
        maps of the images as they are and mirrored (``"mirrors"``: left-right and up-down; ``"rot180"``:
        along both axes at once; :data:`~cellsam.config.FLIP_TESTS`). ``flip_test`` None is the model's
        ``cfg.inference.flip_test``; True / False are ``"mirrors"`` / ``"off"``.
        """
        mode = flip_test_mode(self.cfg.inference.flip_test if flip_test is None else flip_test)
        views = FLIP_TEST_VIEWS[mode] if not self.training and isinstance(self.cellfinder, DenseCellFinder) else ()
        if images is None:
            if self.detector_trunk is not None:
                raise ValueError("this model has a separate detector trunk: pass the preprocessed images")
            if views:
                raise ValueError("the flip test needs the preprocessed images: pass them to detect()")
            return self.cellfinder(enc.trunk)
        outputs = self.cellfinder(enc.trunk if self.detector_trunk is None else self._detector_trunk(images))
        if not views:
            return outputs
        seen = [outputs]
        for dims in views:
            seen.append(unmirror(self.cellfinder(self._detector_trunk(images.flip(dims))), dims))
        return mean_of_views(seen)

    def _detector_trunk(self, images: Tensor) -> Tensor:
        """(B,3,S,S) preprocessed -> the features CellFinder reads (the trunk only, where the encoder has one)."""
        encoder = self.image_encoder if self.detector_trunk is None else self.detector_trunk
        return encoder.forward_trunk(images)

    def postprocess_detections(self, outputs: dict[str, Any], *, box_threshold: float) -> list[dict[str, Tensor]]:
        """Per image: ``scores`` (N,) sorted descending and ``boxes`` (N,4) xyxy pixels of S. No NMS."""
        return self.cellfinder.postprocess(outputs, image_size=self.img_size, box_threshold=box_threshold)

    # ------------------------------------------------------------------ masks
    def decode(
        self,
        embedding: Tensor,
        *,
        boxes: Tensor | None = None,
        points: Points | None = None,
        mask_input: Tensor | None = None,
        multimask_output: bool = False,
        chunk_size: int | str | None = "auto",
        memory_budget_mb: float | None = None,
        window: float | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Decode N prompts on ONE image embedding, in chunks of ``chunk_size`` prompts.

        Arguments:
            embedding: (1,D,h,w) neck embedding of one image.
            boxes: (N,4) xyxy in pixels of the S x S encoder input.
            points: coords (N,P,2) xy pixels of S and labels (N,P) (1 fg, 0 bg, -1 pad).
            mask_input: (N,1,4h,4w) low-res logits from an earlier prediction.
            multimask_output: return SAM's 3 masks per prompt instead of 1; ignored (M = 1) for a model
                whose multimask outputs were never trained (``cfg.inference.multimask`` False, ours from v3).
            chunk_size: prompts per decoder call (bounds memory); ``None`` = all at once; ``"auto"``:
                :meth:`auto_chunk_size`.
            memory_budget_mb: if given, the chunk is instead the number of prompts whose decoder
                activations fit this budget (see :meth:`prompt_bytes`).
            window: box prompts only: compute each mask on a square of tokens about its box's centre,
                ``window`` x the box's longer side plus one token each side (:meth:`box_windows`); the
                logits outside are ``mask_decoder.WINDOW_FILL``. Same values inside the window
                (the output upscaling is local per token), less work. None: the whole grid.
        Returns:
            low_res_logits (N,M,4h,4w) and iou_pred (N,M), M = 3 if multimask_output else 1.
        """
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError(f"expected one image embedding (1,D,h,w), got {tuple(embedding.shape)}")
        n = _num_prompts(boxes, points, mask_input)
        multimask_output = multimask_output and self.cfg.inference.multimask
        m = self.cfg.mask_decoder.num_multimask_outputs if multimask_output else 1
        if n == 0:
            side = self.low_res_size
            empty = embedding.new_zeros((0, m, side, side))
            return empty, embedding.new_zeros((0, m))
        if memory_budget_mb is not None:
            chunk_size = max(1, int(memory_budget_mb * 2**20 // self.prompt_bytes(multimask_output)))
        if chunk_size == "auto":
            chunk_size = self.auto_chunk_size()
        step = n if chunk_size is None else max(1, int(chunk_size))
        image_pe = self.prompt_encoder.get_dense_pe()
        order, sides = None, None
        if window is not None:
            if boxes is None or points is not None or mask_input is not None:
                raise ValueError("window: only for box prompts (no points, no mask_input)")
            sides = self.box_windows(boxes, window)[1]
            order = torch.argsort(sides, stable=True)  # chunks of similar window sizes
            boxes = boxes[order]
            sides = sides[order]
        logits, ious = [], []
        for i in range(0, n, step):
            sl = slice(i, i + step)
            win = None
            if sides is not None and boxes is not None and window is not None:  # set together above
                k = int(sides[sl].max())
                if k < self.cfg.encoder.embedding_size:
                    win = (self.box_windows(boxes[sl], window, side=k)[0], k)
            sparse, dense = self.prompt_encoder(
                points=None if points is None else (points[0][sl], points[1][sl]),
                boxes=None if boxes is None else boxes[sl],
                masks=None if mask_input is None else mask_input[sl],
            )
            lo, iou = self.mask_decoder(
                image_embeddings=embedding,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
                window=win,
                local=self.cfg.inference.local_decoding,
            )
            logits.append(lo)
            ious.append(iou)
        lo, iou = torch.cat(logits), torch.cat(ious)
        if order is not None:
            inv = torch.empty_like(order)
            inv[order] = torch.arange(n, device=order.device)
            lo, iou = lo[inv], iou[inv]
        return lo, iou

    def box_windows(self, boxes: Tensor, scale: float, *, side: int | None = None) -> tuple[Tensor, Tensor]:
        """Token windows for box prompts (see :meth:`decode`'s ``window``).

        Arguments:
            boxes: (N,4) xyxy pixels of the S x S input; scale: window side / the box's longer side.
            side: one window side (tokens) for all boxes instead of each box's own.
        Returns:
            origins (N,2) long (row, col) of each window's first token, inside the grid, and sides (N,)
            long: ``ceil(scale * longer side / token + 2)``, at most the grid side (``side`` if given).
        """
        if not scale > 0:
            raise ValueError(f"window scale must be > 0, got {scale}")
        grid = self.cfg.encoder.embedding_size
        token = self.img_size / grid
        b = boxes.float()
        longer = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).clamp(min=0)
        sides = torch.ceil(scale * longer / token + 2).long().clamp(1, grid)
        if side is not None:
            sides = torch.full_like(sides, int(side))
        centre = torch.stack([(b[:, 1] + b[:, 3]) / 2, (b[:, 0] + b[:, 2]) / 2], dim=1) / token  # (row, col)
        origins = torch.round(centre - sides[:, None].float() / 2).long()
        origins = torch.minimum(origins.clamp(min=0), (grid - sides)[:, None])
        return origins, sides

    def auto_chunk_size(self) -> int:
        """Prompts per mask-decoder call: 64 on a GPU; on a CPU as many as keep one (D, h, w) copy of
        the image tokens per call within 4 MiB (cache-sized), at least 4 and at most 16.

        Every prompt carries its own copy of the image tokens through the two-way transformer, so on
        a CPU large chunks run out of cache: measured on the 2-core machine beside a training job (ms
        per box, chunks of 1 / 4 / 8 / 32): the shipped model 12.3 / 6.7 / 6.3 / 8.0, ViT-B 102 / 74 /
        96 / 98.
        """
        if self.device.type != "cpu":
            return 64
        d, side = self.cfg.encoder.out_chans, self.cfg.encoder.embedding_size
        return int(min(16, max(4, (4 << 20) // (4 * d * side * side))))

    def prompt_bytes(self, multimask_output: bool = False) -> int:
        """Approximate float32 activation bytes the mask decoder needs per prompt.

        Per prompt SAM's decoder holds a few copies of the (D,h,w) image tokens in the two-way
        transformer, the upscaled (D/8,4h,4w) features and the (M,4h,4w) logits.
        """
        d, side = self.cfg.encoder.out_chans, self.cfg.encoder.embedding_size
        m = self.cfg.mask_decoder.num_multimask_outputs + 1 if multimask_output else 1
        tokens = 4 * d * side * side  # src, keys, attention outputs, residuals
        upscaled = 2 * (d // 8) * (4 * side) ** 2 + (d // 4) * (2 * side) ** 2
        return 4 * (tokens + upscaled + m * (4 * side) ** 2)

    def upscale_logits(self, low_res: Tensor) -> Tensor:
        """(N,M,4h,4w) low-res logits -> (N,M,S,S) by bilinear interpolation (SAM's postprocess)."""
        return F.interpolate(low_res, (self.img_size, self.img_size), mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ all together
    @torch.no_grad()
    def forward(
        self,
        images: Tensor,
        *,
        box_threshold: float = 0.4,
        chunk_size: int | None = 64,
    ) -> list[dict[str, Tensor]]:
        """Detect and decode every cell of each image of a batch (B,3,S,S) in [0,1].

        Returns per image: ``boxes`` (N,4) xyxy pixels of S, ``scores`` (N,), ``low_res_logits``
        (N,1,4h,4w) and ``iou_pred`` (N,). Thresholding of IoU / mask probability and label
        assembly happen in :mod:`cellsam.inference`.
        """
        x = self.preprocess(images)
        enc = self.encode(x)
        dets = self.postprocess_detections(self.detect(enc, x), box_threshold=box_threshold)
        results = []
        for b, det in enumerate(dets):
            lo, iou = self.decode(enc.embedding[b : b + 1], boxes=det["boxes"], chunk_size=chunk_size)
            results.append(
                {"boxes": det["boxes"], "scores": det["scores"], "low_res_logits": lo, "iou_pred": iou[:, 0]}
            )
        return results


def _num_prompts(boxes: Tensor | None, points: Points | None, mask_input: Tensor | None) -> int:
    sizes = {t.shape[0] for t in (boxes, None if points is None else points[0], mask_input) if t is not None}
    if not sizes:
        raise ValueError("give at least one prompt: boxes, points or mask_input")
    if len(sizes) > 1:
        raise ValueError(f"boxes, points and mask_input disagree on the number of prompts: {sorted(sizes)}")
    return sizes.pop()
