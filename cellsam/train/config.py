"""Training configuration: every hyper-parameter lives here and in the YAML files of ``configs/``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cellsam.config import dataclass_from_dict
from cellsam.train.transforms import AugmentConfig

Stage = Literal["detection", "masks", "joint", "size"]


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (DETR style ``weight_dict``) and Hungarian matcher costs."""

    cls: float = 2.0
    bbox: float = 5.0
    giou: float = 2.0
    focal_alpha: float = 0.25
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    # one-to-many box regression of every query whose anchor lies in a cell (cellsam.train.anchor_loss);
    # 0 = off (the paper's recipe)
    anchor_bbox: float = 0.0
    anchor_giou: float = 0.0
    # the dense CellFinder (cellsam.train.dense_loss)
    heatmap: float = 1.0
    dense_size: float = 1.0
    dense_offset: float = 1.0
    dense_giou: float = 1.0
    # > 0: TTFNet's size-spread Gaussians and regression area (TTFNet's 0.54); 0: CenterNet's
    dense_ttf_alpha: float = 0.0
    mask_focal: float = 20.0
    mask_dice: float = 1.0
    iou: float = 1.0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW parameter groups and the step schedule (drop x ``lr_drop_factor`` at ``lr_drop_at``)."""

    lr_encoder: float = 1e-5
    lr_head: float = 1e-4  # CellFinder
    lr_neck: float = 1e-4
    lr_decoder: float = 1e-4  # prompt encoder + mask decoder
    weight_decay: float = 1e-4
    clip_norm: float = 0.1  # 0 disables clipping
    lr_drop_at: float = 0.7  # fraction of max_steps
    lr_drop_factor: float = 0.1
    warmup_steps: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """One training run (one stage).

    ``stage``: "detection" trains encoder + CellFinder on boxes (paper stage 1); "masks" freezes the
    encoder trunk and trains ``mask_trainable`` (paper stage 2, ground-truth boxes as prompts);
    "joint" trains everything on both losses (our from-scratch warm start, see configs/README).
    """

    stage: Stage = "detection"
    model: str = "vit_cpu"  # variant name (random init) ...
    init: str | None = None  # ... or a checkpoint to start from (ours, Meta SAM .pth, official .pt)
    # Changes to the variant's architecture config, e.g. {cellfinder: {pos_scale: 1.0}}.
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # True: build ``model`` (+ overrides) and load only the weights of ``init`` into it (strictly),
    # e.g. to continue training with a changed non-parametric setting such as pos_scale.
    init_weights_only: bool = False
    data: str = "prepared"
    output: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 2
    num_workers: int = 0
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    balance_sources: bool = True  # False: shuffled passes over all tiles
    # How balanced: source s is drawn with probability proportional to n_s ** (1 - source_balance)
    # (n_s its tile count): 1 = every source equally often, 0.5 = by the square root of its size
    # ("temperature" sampling, between equal and proportional), 0 = by tile count.
    source_balance: float = 1.0
    # Train (and validate) on some sources only: specialists (sources: [dsb2018]) and
    # leave-one-source-out runs (exclude_sources: [monuseg]); empty = every source.
    sources: tuple[str, ...] = ()
    exclude_sources: tuple[str, ...] = ()
    crop_size: int | None = None  # random crops of the prepared tiles (None: whole tiles); val: centre crop
    prompts_per_image: int = 16  # ground-truth boxes decoded per image in the masks/joint stages
    box_jitter: float = 0.05  # relative noise added to prompt boxes (SAM-style)
    # Prompt boxes' width and height scaled about their centre by exp(U(-a, a)): a > 0 teaches the mask
    # decoder to segment the cell at the box centre when the box is too loose or too tight, as the
    # detector's boxes can be (0 = off; ln 2.5 = 0.92 allows 0.4x .. 2.5x).
    box_scale_jitter: float = 0.0
    # Click prompts (cellsam.train.clicks): this fraction of the decoded cells get a positive click
    # uniform inside the cell instead of a box, then ``click_rounds`` corrective clicks, each drawn from
    # the error region of the previous prediction with its low-res logits as the mask prompt (SAM's
    # simulation); every round's mask is in the loss.
    point_prompt_p: float = 0.0
    click_rounds: int = 1
    mask_trainable: tuple[str, ...] = ("neck", "prompt_encoder", "mask_decoder")
    # An exponential moving average of the weights (cellsam.train.averaging): the stage validates and exports
    # the average, updated after every step from ema_start_step on with this decay (0 = off).
    ema_decay: float = 0.0
    ema_start_step: int = 0
    val_every_steps: int = 0  # 0 = only at the end
    val_max_tiles: int = 64
    val_box_threshold: float = 0.4
    log_every_steps: int = 10
    checkpoint_every_steps: int = 200
    version: str = "dev"
    # "size" stage (cellsam.train.size): crops of the training tiles shown at scales log-uniform in
    # size_scale_range; a ridge regression from the encoder's style vector to the log cell diameter.
    size_samples: int = 2000
    size_scale_range: tuple[float, float] = (0.35, 3.0)
    size_ridge: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.stage not in ("detection", "masks", "joint", "size"):
            raise ValueError(f"stage must be detection, masks, joint or size, got {self.stage!r}")
        lo, hi = self.size_scale_range
        if not 0 < lo < hi or self.size_samples < 2 or self.size_ridge < 0:
            raise ValueError("size stage: need 0 < size_scale_range[0] < [1], size_samples >= 2, size_ridge >= 0")
        bad = set(self.mask_trainable) - {"neck", "prompt_encoder", "mask_decoder"}
        if bad:
            raise ValueError(f"mask_trainable: unknown parts {sorted(bad)}")
        if not 0.0 <= self.source_balance <= 1.0:
            raise ValueError(f"source_balance must be in [0, 1], got {self.source_balance}")
        if not 0.0 <= self.point_prompt_p <= 1.0 or self.click_rounds < 0:
            raise ValueError("point_prompt_p must be in [0, 1] and click_rounds >= 0")
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_start_step < 0:
            raise ValueError(f"ema_decay must be in [0, 1) (0: off) and ema_start_step >= 0, got {self.ema_decay}, "
                             f"{self.ema_start_step}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return dataclass_from_dict(cls, d)


def load_train_configs(path: str | Path, overrides: dict[str, Any] | None = None, *,
                       output_root: str | Path | None = None) -> list[TrainConfig]:
    """Read a YAML training config: one stage, or a recipe of stages run in order.

    A recipe has ``common:`` (keys shared by all stages) and ``stages:`` (a list of per-stage keys);
    each stage after the first starts from the model the previous stage exported unless it sets
    ``init`` itself. ``overrides`` (dotted keys, e.g. ``optim.lr_head``) apply to every stage.
    ``output_root`` moves every stage's output to ``output_root/<last part of its output>`` (a second
    run of a recipe, e.g. a specialist, beside the first; the stages still chain).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"training config not found: {p}")
    d = yaml.safe_load(p.read_text()) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a mapping at the top level")
    if "stages" in d:
        common = d.get("common") or {}
        unknown = set(d) - {"common", "stages"}
        if unknown:
            raise ValueError(f"{p}: a recipe has only 'common' and 'stages', found {sorted(unknown)}")
        stage_dicts = [merge_dicts(common, s) for s in d["stages"]]
    else:
        stage_dicts = [d]
    configs: list[TrainConfig] = []
    for sd in stage_dicts:
        for key, value in (overrides or {}).items():
            node = sd
            *parents, leaf = key.split(".")
            for k in parents:
                node = node.setdefault(k, {})
            node[leaf] = value
        if output_root is not None:
            sd["output"] = str(Path(output_root) / Path(str(sd.get("output", "run"))).name)
        if configs and not sd.get("init"):
            sd["init"] = str(Path(configs[-1].output) / "model.safetensors")
        configs.append(TrainConfig.from_dict(sd))
    outputs = [c.output for c in configs]
    if output_root is not None and len(set(outputs)) < len(outputs):
        raise ValueError(f"--output-root maps two stages to the same folder: {outputs}")
    return configs


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
