"""Interactive prediction: embed an image once, then answer many prompts (SAM's ``SamPredictor``).

``Predictor(model).set_image(image)`` normalises the image, resizes its longest side to the
encoder input S (aspect ratio kept, SAM's ``ResizeLongestSide``), pads it to S x S and runs the
encoder once. ``predict(...)`` decodes point / box / mask prompts against the cached embedding
and ``detect()`` runs CellFinder on the cached trunk features. All coordinates are (x, y)
pixels of the ORIGINAL image.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cellsam.config import AUTO, check_polarity
from cellsam.inference.polarity import invert_whole_cell, prefers_inverted
from cellsam.inference.preprocess import prepare_image, stain_grey, to_channels_last
from cellsam.models.protocol import PromptableModel, check_model, inference_defaults, model_tile_size

logger = logging.getLogger(__name__)

MASK_THRESHOLD = 0.0  # on logits, as SAM
SHRINK_WARNING = 0.6  # set_image warns when the image's cells shrink below this share of the model's scale


def resized_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(h', w') with the longest side equal to ``long_side`` (SAM's rounding)."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


class Predictor:
    """SAM-style predictor over a :class:`~cellsam.models.cellsam.CellSAM` (any
    :class:`~cellsam.models.protocol.PromptableModel`).

    Example::

        p = Predictor(model)
        p.set_image(img)                                       # one encoder pass
        boxes, scores = p.detect()                             # CellFinder boxes (N,4) xyxy
        masks, ious, low_res = p.predict(box=boxes[0])         # (3,H,W) bool, (3,), (3,4h,4w)
    """

    def __init__(self, model: PromptableModel) -> None:
        check_model(model, PromptableModel, message="Predictor needs a CellSAM model")
        if getattr(model, "training", False):
            logger.warning("Predictor got a model in training mode (dropout active); call model.eval() first")
        self.model = model
        self.reset_image()

    # ------------------------------------------------------------------ image
    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @property
    def is_image_set(self) -> bool:
        return self._features is not None

    def reset_image(self) -> None:
        """Forget the current image and its cached features."""
        self._features: Any = None  # EncoderOutput of the padded image
        self._input: Tensor | None = None  # (1,3,S,S) preprocessed, for a separate detector trunk
        self._detections: dict[str, Tensor] | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.inverted = False  # whether the model sees the whole-cell channel inverted (set_image's polarity)

    @torch.no_grad()
    def set_image(
        self,
        image: Any,
        *,
        channel_axis: int | None = None,
        channels: tuple | None = None,
        normalize: bool = True,
        check_scale: bool = True,
        polarity: str = "as_is",
    ) -> None:
        """Embed ``image`` once (a new image replaces the old one).

        Args:
            image: (H, W), or (C, H, W) / (H, W, C) with ``channel_axis`` (see
                :func:`cellsam.inference.preprocess.prepare_image`).
            channel_axis, channels: as in ``prepare_image``.
            normalize: True (default): CellSAM's normalisation and channel layout. False: the image
                is used as-is: a 3-channel uint8 image (e.g. RGB, exactly as ``SamPredictor`` takes
                it, resized with PIL like SAM) or a 3-channel float image already in [0, 1].
            check_scale: warn when the image is so much larger than the model's tile that its cells shrink
                below :data:`SHRINK_WARNING` of the model's scale. False for a caller that cut the image
                at a chosen scale (the web app's and napari's tiles: there the shrink is the rescaling).
            polarity: "as_is" (default: the image as given, as SAM's predictor), "inverted" (the whole-cell
                channel inverted), or "auto" (inverted when :func:`cellsam.segment` would invert it: a
                light background and a more confident CellFinder, :mod:`cellsam.inference.polarity`, at
                the model's own tile); the last two need CellSAM's layout (not a uint8 image with
                ``normalize=False``). :attr:`inverted` says what was done.
        """
        check_polarity(polarity)
        if polarity == AUTO and getattr(self.model, "cellfinder", None) is None:
            raise ValueError("polarity='auto' asks the CellFinder, and this model has none: give 'as_is' or 'inverted'")
        self.reset_image()
        s = int(self.model.img_size)
        x255, (h, w) = self._to_resized_255(image, channel_axis, channels, normalize, s, polarity)
        x = (x255.to(self.device) - self.model.pixel_mean) / self.model.pixel_std  # (1,3,h',w')
        hr, wr = x.shape[-2:]
        x = F.pad(x, (0, s - wr, 0, s - hr))  # pad after normalising, as SAM
        self._features = self.model.encode(x)
        self._input = x if getattr(self.model, "detector_trunk", None) is not None else None
        self.original_size, self.input_size = (h, w), (int(hr), int(wr))
        tile = model_tile_size(self.model)
        if check_scale and tile / max(h, w) < SHRINK_WARNING:
            logger.warning(
                "Predictor shows the whole %dx%d image to the model at %d px (SAM's resize): its cells are at "
                "%.2fx the scale the model was trained at, too small to find or outline well. Use "
                "cellsam.segment for whole images, a crop of about %d px around the cells for prompts, or the "
                "click tools of `cellsam serve` / napari, which prompt each tile at the model's scale",
                h, w, s, tile / max(h, w), tile)

    def _to_resized_255(
        self, image: Any, channel_axis: int | None, channels: tuple | None, normalize: bool, s: int,
        polarity: str = "as_is",
    ) -> tuple[Tensor, tuple[int, int]]:
        """(1,3,h',w') float32 on the 0..255 scale, and the original (H, W)."""
        if not normalize:
            raw = to_channels_last(image, channel_axis=channel_axis)
            if raw.dtype == np.uint8:
                if channels is not None or raw.shape[2] != 3:
                    raise ValueError(
                        f"normalize=False takes a 3-channel image and no channels=; "
                        f"got shape {raw.shape} (channels last), channels={channels!r}"
                    )
                if polarity != "as_is":
                    raise ValueError("polarity needs CellSAM's layout: a uint8 image with normalize=False is "
                                     "used as it is")
                from PIL import Image

                h, w = raw.shape[:2]
                hr, wr = resized_shape(h, w, s)
                resized = np.asarray(
                    Image.fromarray(np.ascontiguousarray(raw)).resize((wr, hr), Image.Resampling.BILINEAR)
                )
                t = torch.from_numpy(resized.copy()).permute(2, 0, 1)[None].float()
                return t, (h, w)
        img = prepare_image(image, channel_axis=channel_axis, channels=channels, normalize=normalize,
                            stain=stain_grey(self.model))
        if polarity == "inverted" or (polarity == AUTO and prefers_inverted(
                self.model, img, model_tile_size(self.model), self.device,
                inference_defaults(self.model).box_threshold)):
            img = invert_whole_cell(img)
            self.inverted = True
        h, w = img.shape[1:]
        hr, wr = resized_shape(h, w, s)
        t = torch.from_numpy(img)[None]
        if (hr, wr) != (h, w):
            t = F.interpolate(t, (hr, wr), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        return t * 255.0, (h, w)

    def _require_image(self, what: str) -> None:
        if self._features is None:
            raise RuntimeError(f"no image is set: call Predictor.set_image(image) before {what}()")

    # ------------------------------------------------------------------ coordinates
    def _scale_xy(self) -> tuple[float, float]:
        (h, w), (hr, wr) = self.original_size, self.input_size  # type: ignore[misc]
        return wr / w, hr / h

    def _to_input_frame(self, xy: Tensor) -> Tensor:
        """(..., 2k) xy pixels of the original image -> of the resized input (as SAM's apply_coords)."""
        sx, sy = self._scale_xy()
        scale = torch.tensor([sx, sy], dtype=xy.dtype, device=xy.device).repeat(xy.shape[-1] // 2)
        return xy * scale

    def _as_tensor(self, a: Any, name: str, *, dtype: torch.dtype = torch.float32) -> Tensor:
        t = torch.as_tensor(np.asarray(a), dtype=dtype, device=self.device)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        return t

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def predict(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask_input: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for the prompts, as ``segment_anything.SamPredictor.predict``.

        Args:
            point_coords: (P, 2) xy pixels of the original image, or (N, P, 2) for N prompts.
            point_labels: (P,) or (N, P): 1 foreground, 0 background.
            box: (4,) xyxy pixels, or (N, 4) for N prompts decoded in one batch.
            mask_input: (1, 4h, 4w) low-res logits of an earlier call, or (N, 1, 4h, 4w).
            multimask_output: 3 candidate masks (M = 3) instead of 1; ignored (M = 1) for a model whose
                multimask outputs are untrained (``cfg.inference.multimask`` False: see ``CellSAM.decode``).
            return_logits: return mask logits instead of booleans.
        Returns:
            masks (M, H, W) bool (float logits with ``return_logits``), scores (M,) predicted IoUs,
            low_res_logits (M, 4h, 4w); with batched prompts (a (N, 4) box, (N, P, 2) points or
            (N, 1, 4h, 4w) mask_input) each gains a leading N.
        """
        self._require_image("predict")
        if point_coords is None and box is None and mask_input is None:
            raise ValueError("give at least one prompt: point_coords (with point_labels), box or mask_input")
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        batched = False
        points = None
        if point_coords is not None:
            coords = self._as_tensor(point_coords, "point_coords")
            labels = self._as_tensor(point_labels, "point_labels", dtype=torch.int64)
            if coords.ndim not in (2, 3) or coords.shape[-1] != 2 or labels.shape != coords.shape[:-1] \
                    or coords.shape[-2] == 0:
                raise ValueError(
                    f"point_coords must be (P, 2) or (N, P, 2) with P >= 1 and point_labels (P,) or (N, P); got "
                    f"{tuple(coords.shape)} and {tuple(labels.shape)}"
                )
            batched |= coords.ndim == 3
            points = (
                self._to_input_frame(coords.reshape(-1, coords.shape[-2], 2)),
                labels.reshape(-1, labels.shape[-1]),
            )
        boxes = None
        if box is not None:
            b = self._as_tensor(box, "box")
            if b.ndim not in (1, 2) or b.shape[-1] != 4:
                raise ValueError(f"box must be (4,) or (N, 4) xyxy, got shape {tuple(b.shape)}")
            batched |= b.ndim == 2
            boxes = self._to_input_frame(b.reshape(-1, 4))
        masks_in = None
        if mask_input is not None:
            m = self._as_tensor(mask_input, "mask_input")
            side = self.model.low_res_size
            if m.ndim not in (3, 4) or tuple(m.shape[-3:]) != (1, side, side):
                raise ValueError(
                    f"mask_input must be (1, {side}, {side}) or (N, 1, {side}, {side}), got {tuple(m.shape)}"
                )
            batched |= m.ndim == 4
            masks_in = m.reshape(-1, 1, side, side)
        n = max(t.shape[0] for t in (boxes, masks_in, None if points is None else points[0]) if t is not None)
        if points is not None and points[0].shape[0] == 1 and n > 1:  # one point set shared by N boxes
            points = (points[0].expand(n, -1, -1), points[1].expand(n, -1))
        low_res, iou = self.model.decode(
            self._features.embedding,
            boxes=boxes,
            points=points,
            mask_input=masks_in,
            multimask_output=multimask_output,
        )
        masks = self._postprocess(low_res)
        if not return_logits:
            masks = masks > MASK_THRESHOLD
        out = (masks.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy())
        return out if batched else (out[0][0], out[1][0], out[2][0])

    def _postprocess(self, low_res: Tensor) -> Tensor:
        """(N,M,4h,4w) -> (N,M,H,W) logits: upscale to S, crop the padding, resize to the original."""
        (hr, wr), (h, w) = self.input_size, self.original_size  # type: ignore[misc]
        up = self.model.upscale_logits(low_res.float())[..., :hr, :wr]
        return F.interpolate(up, (h, w), mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ detection
    @torch.no_grad()
    def detect(self, box_threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """CellFinder on the cached features (``box_threshold=None``: the model's own default).

        Returns:
            boxes (N, 4) float32 xyxy pixels of the original image (clipped to it; boxes lying
            wholly in the padding dropped) and scores (N,) float32, sorted by descending score.
        """
        self._require_image("detect")
        if box_threshold is None:
            box_threshold = self.model.cfg.inference.box_threshold
        if not 0.0 <= float(box_threshold) < 1.0:
            raise ValueError(f"box_threshold must be in [0, 1), got {box_threshold}")
        if self._detections is None:
            out = self.model.detect(self._features, self._input)  # DETR's logits and boxes or the dense maps
            self._detections = {k: v for k, v in out.items() if k != "aux_outputs"}
        det = self.model.postprocess_detections(self._detections, box_threshold=float(box_threshold))[0]
        (h, w) = self.original_size  # type: ignore[misc]
        sx, sy = self._scale_xy()
        boxes = det["boxes"].float() / torch.tensor([sx, sy, sx, sy], device=det["boxes"].device)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[keep].cpu().numpy(), det["scores"][keep].float().cpu().numpy()
