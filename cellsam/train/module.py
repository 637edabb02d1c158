"""Lightning module for the two training stages (and the joint warm start).

The model is a plain :class:`~cellsam.models.cellsam.CellSAM`; this module only adds losses,
optimiser groups, freezing and validation. Distribution (DDP, multi-node) is Lightning's.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from cellsam.models.cellsam import CellSAM
from cellsam.ops.boxes import scale_boxes
from cellsam.train.clicks import correction_clicks, random_points
from cellsam.train.config import TrainConfig
from cellsam.train.criterion import SetCriterion, anchor_weight_dict, detection_weight_dict, total_loss
from cellsam.train.dense_loss import DenseCriterion, dense_weight_dict
from cellsam.train.mask_loss import mask_losses, mask_weight_dict
from cellsam.train.matcher import HungarianMatcher

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss becomes NaN or infinite."""


class CellSAMModule(L.LightningModule):
    """Trains ``model`` according to ``cfg.stage`` (detection, masks or joint)."""

    def __init__(self, model: CellSAM, cfg: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        lc = cfg.loss
        self.mask_weights = mask_weight_dict(focal=lc.mask_focal, dice=lc.mask_dice, iou=lc.iou)
        self.criterion: SetCriterion | DenseCriterion
        if model.cfg.detector_kind == "dense":
            self.criterion = DenseCriterion(stride=model.cfg.dense_finder.stride, weight_dict=dense_weight_dict(
                heatmap=lc.heatmap, size=lc.dense_size, offset=lc.dense_offset, giou=lc.dense_giou),
                ttf_alpha=lc.dense_ttf_alpha)
        else:
            matcher = HungarianMatcher(cost_class=lc.cost_class, cost_bbox=lc.cost_bbox, cost_giou=lc.cost_giou,
                                       focal_alpha=lc.focal_alpha)
            weight_dict = detection_weight_dict(num_decoder_layers=model.cfg.cellfinder.dec_layers, ce=lc.cls,
                                                bbox=lc.bbox, giou=lc.giou)
            anchor_losses = lc.anchor_bbox > 0 or lc.anchor_giou > 0
            if anchor_losses:
                weight_dict.update(anchor_weight_dict(num_decoder_layers=model.cfg.cellfinder.dec_layers,
                                                      bbox=lc.anchor_bbox, giou=lc.anchor_giou))
            self.criterion = SetCriterion(model.cfg.cellfinder.num_classes, matcher, weight_dict,
                                          focal_alpha=lc.focal_alpha, anchor_losses=anchor_losses)
        self._set_trainable()
        self.stream_sampler: Any = None  # set by cellsam.train.run; skips consumed samples on resume

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """A frozen encoder trunk stays in eval mode (its batch-norm statistics must not drift)."""
        if "encoder" not in self._trainable_parts():
            enc = self.model.image_encoder
            enc.eval()
            enc.neck.train("neck" in self._trainable_parts())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.stream_sampler is not None:
            self.stream_sampler.start_step = int(checkpoint["global_step"])

    # ------------------------------------------------------------------ parameters
    def _groups(self) -> dict[str, list[torch.nn.Parameter]]:
        m = self.model
        neck = list(m.image_encoder.neck.parameters())
        neck_ids = {id(p) for p in neck}
        return {
            "encoder": [p for p in m.image_encoder.parameters() if id(p) not in neck_ids],
            "neck": neck,
            "head": list(m.cellfinder.parameters()),
            "prompt_encoder": list(m.prompt_encoder.parameters()),
            "mask_decoder": list(m.mask_decoder.parameters()),
        }

    def _trainable_parts(self) -> set[str]:
        stage = self.cfg.stage
        if stage == "detection":
            return {"encoder", "head"}
        if stage == "masks":
            return set(self.cfg.mask_trainable)
        return {"encoder", "head", "neck", "prompt_encoder", "mask_decoder"}

    def _set_trainable(self) -> None:
        parts = self._trainable_parts()
        for name, params in self._groups().items():
            for p in params:
                p.requires_grad_(name in parts)
        if self.model.detector_trunk is not None:
            self.model.detector_trunk.requires_grad_("encoder" in parts)

    def configure_optimizers(self) -> Any:
        oc = self.cfg.optim
        lrs = {"encoder": oc.lr_encoder, "neck": oc.lr_neck, "head": oc.lr_head,
               "prompt_encoder": oc.lr_decoder, "mask_decoder": oc.lr_decoder}
        parts = self._trainable_parts()
        groups = [{"params": ps, "lr": lrs[name], "name": name}
                  for name, ps in self._groups().items() if name in parts and ps]
        opt = torch.optim.AdamW(groups, weight_decay=oc.weight_decay)
        total, drop, warm = self.cfg.max_steps, int(oc.lr_drop_at * self.cfg.max_steps), oc.warmup_steps

        def factor(step: int) -> float:
            f = oc.lr_drop_factor if step >= drop else 1.0
            return f * min(1.0, (step + 1) / warm) if warm > 0 else f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        log.debug("optimiser groups %s, %d steps, lr drop at %d", [g["name"] for g in groups], total, drop)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ losses
    def _resize(self, images: Tensor) -> Tensor:
        s = self.model.img_size
        if images.shape[-1] == s and images.shape[-2] == s:
            return images
        return F.interpolate(images, (s, s), mode="bilinear", align_corners=False)

    def compute_losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """All losses of the configured stage for a batch (B,3,T,T) in [0,1]; key ``loss`` is the total:
        :func:`total_loss` of the criterion's weighted total (weight 1) and the weighted mask losses."""
        stage = self.cfg.stage
        x = self.model.preprocess(self._resize(images))
        losses: dict[str, Tensor] = {}
        terms: dict[str, Tensor] = {}  # in this order: detection total, then the mask losses
        weights: dict[str, float] = {}
        if stage == "masks":
            with torch.no_grad():
                trunk = self.model.image_encoder.forward_trunk(x)
            embedding = self.model.image_encoder.neck(trunk) if "neck" in self.cfg.mask_trainable else (
                self.model.image_encoder.neck(trunk).detach())
            enc = None
        else:
            enc = self.model.encode(x)
            embedding = enc.embedding
        if stage in ("detection", "joint"):
            assert enc is not None
            outputs = self.model.detect(enc, x)
            det_targets = [{"labels": t["labels"], "boxes": t["boxes"]} for t in targets]
            det = self.criterion(outputs, det_targets)
            terms["loss_detection"], weights["loss_detection"] = self.criterion.total(det), 1.0
            losses.update({k: v for k, v in det.items() if not k.rsplit("_", 1)[-1].isdigit()})  # last layer only
        if stage in ("masks", "joint"):
            ml = self._mask_losses(embedding, targets, tile=images.shape[-1])
            terms.update(ml)
            weights.update(self.mask_weights)
            losses.update(ml)
        losses["loss"] = images.new_zeros(()) + total_loss(terms, weights)
        return losses

    def _mask_losses(self, embedding: Tensor, targets: list[dict[str, Tensor]], *, tile: int) -> dict[str, Tensor]:
        """Prompts for up to ``prompts_per_image`` cells per image: jittered ground-truth boxes, or (a
        ``point_prompt_p`` share) a click in the cell followed by ``click_rounds`` corrective clicks;
        the cells' masks are the targets of every decoded round."""
        k = self.cfg.prompts_per_image
        scale = self.model.img_size / tile
        all_logits, all_iou, all_tgt = [], [], []
        for b, t in enumerate(targets):
            m = t["ids"].numel()
            if m == 0:
                continue
            # seeded by (seed, step, image): a resumed run draws the same prompts
            g = torch.Generator().manual_seed(hash((self.cfg.seed, self.global_step, b)) & 0x7FFFFFFF)
            sel = torch.randperm(m, generator=g)[:k]
            tgt = (t["labels_image"][None] == t["ids"][sel.to(t["ids"].device)][:, None, None]).float()[:, None]
            n_click = int(torch.binomial(torch.tensor(float(sel.numel())), torch.tensor(self.cfg.point_prompt_p),
                                         generator=g)) if self.cfg.point_prompt_p > 0 else 0
            emb = embedding[b : b + 1]
            if n_click < sel.numel():
                boxes = self._jittered_boxes(t["boxes_xyxy"][sel[n_click:]].to(embedding), g)
                lo, iou = self.model.decode(emb, boxes=boxes * scale, chunk_size=None)
                all_logits.append(F.interpolate(lo, (tile, tile), mode="bilinear", align_corners=False))
                all_iou.append(iou)
                all_tgt.append(tgt[n_click:].to(lo))
            if n_click:
                for logits, iou in self._click_rounds(emb, tgt[:n_click, 0].bool(), g, tile=tile):
                    all_logits.append(logits)
                    all_iou.append(iou)
                    all_tgt.append(tgt[:n_click].to(logits))
        if not all_logits:
            z = embedding.sum() * 0.0
            return {"loss_mask_focal": z, "loss_mask_dice": z, "loss_iou": z}
        return mask_losses(torch.cat(all_logits), torch.cat(all_tgt), torch.cat(all_iou))

    def _jittered_boxes(self, boxes: Tensor, g: torch.Generator) -> Tensor:
        """(N,4) xyxy boxes with SAM-style noise (``box_jitter``) and scale jitter (``box_scale_jitter``)."""
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        boxes = boxes + self.cfg.box_jitter * wh * torch.randn(boxes.shape, generator=g).to(boxes)
        if self.cfg.box_scale_jitter > 0:
            boxes = scale_boxes(boxes, torch.empty(len(boxes), 2).uniform_(
                -self.cfg.box_scale_jitter, self.cfg.box_scale_jitter, generator=g).exp().to(boxes))
        return boxes

    def _click_rounds(self, emb: Tensor, masks: Tensor, g: torch.Generator, *,
                      tile: int) -> list[tuple[Tensor, Tensor]]:
        """A positive click in each cell (N,tile,tile) then ``click_rounds`` corrections; per round the
        (N,1,tile,tile) logits and (N,1) IoU predictions."""
        scale = self.model.img_size / tile
        coords = random_points(masks.cpu(), g)[:, None].to(emb)  # (N,1,2) tile pixels
        labels = torch.ones(coords.shape[:2], dtype=torch.long, device=emb.device)
        mask_input = None
        rounds = []
        for r in range(1 + self.cfg.click_rounds):
            lo, iou = self.model.decode(emb, points=(coords * scale, labels), mask_input=mask_input, chunk_size=None)
            logits = F.interpolate(lo, (tile, tile), mode="bilinear", align_corners=False)
            rounds.append((logits, iou))
            if r == self.cfg.click_rounds:
                break
            xy, lab = correction_clicks((logits[:, 0] > 0).detach().cpu(), masks.cpu(), g)
            coords = torch.cat([coords, xy[:, None].to(emb)], dim=1)
            labels = torch.cat([labels, lab[:, None].to(labels)], dim=1)
            mask_input = lo.detach()
        return rounds

    # ------------------------------------------------------------------ loops
    def training_step(self, batch: tuple[Tensor, list[dict[str, Tensor]]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.compute_losses(images, targets)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            bad = {k: float(v) for k, v in losses.items()}
            raise NonFiniteLossError(f"non-finite loss at step {self.global_step}: {bad}; lower the learning "
                                     "rate or check the data (cellsam prepare) for empty or broken tiles")
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=False,
                      batch_size=images.shape[0])
        self.log("loss", loss.detach(), prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, list[dict[str, Tensor]]], batch_idx: int) -> None:
        images, targets = batch
        losses = self.compute_losses(images, targets)
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=images.shape[0], sync_dist=True)
        f1 = self._f1(images, targets)
        if not math.isnan(f1):
            self.log("val/f1_50", f1, prog_bar=True, batch_size=images.shape[0], sync_dist=True)

    def _f1(self, images: Tensor, targets: list[dict[str, Tensor]]) -> float:
        """Mean F1 at IoU 0.5 (reference-code rule) of the full pipeline (boxes -> masks -> labels)."""
        if self.cfg.stage == "masks":
            return float("nan")  # the detector is not trained in this stage
        from cellsam.eval.metrics import evaluate_labels
        from cellsam.inference.segment import segment

        imgs = [im.float().cpu().numpy() for im in images]
        segs = segment(imgs, self.model, normalize=False, channel_axis=0, box_threshold=self.cfg.val_box_threshold,
                       tile_size=self.model.cfg.tile_size)
        assert isinstance(segs, list)  # a list of images in, a list of results out
        gts = [t["labels_image"].cpu().numpy() for t in targets]
        summary = evaluate_labels(gts, [s.labels for s in segs], deepcell=False, coco=False, per_image=False)
        return float(summary["f1_mean"])
