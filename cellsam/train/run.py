"""``train(cfg)``: build or load the model, data and Lightning trainer, run one stage, export weights."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from cellsam.config import CellSAMConfig
from cellsam.models.build import build_model
from cellsam.models.cellsam import CellSAM
from cellsam.models.conv_encoder import set_fast_inference
from cellsam.registry import get_config
from cellsam.train.config import TrainConfig, merge_dicts
from cellsam.train.dataset import PreparedTiles, StreamSampler, adopt_data_stain, collate
from cellsam.train.module import CellSAMModule

log = logging.getLogger(__name__)


def model_config(cfg: TrainConfig) -> CellSAMConfig:
    """The variant ``cfg.model`` with ``cfg.model_overrides`` applied (nested keys)."""
    base = get_config(cfg.model).to_dict()
    return CellSAMConfig.from_dict(merge_dicts(base, cfg.model_overrides))


def initial_model(cfg: TrainConfig) -> CellSAM:
    """The model a run starts from: the ``cfg.init`` checkpoint if given (with ``init_weights_only``:
    its weights in the ``cfg.model`` architecture), else ``cfg.model`` at random init; its colour rule is
    that of ``cfg.data`` (:func:`~cellsam.train.dataset.adopt_data_stain`)."""
    torch.manual_seed(cfg.seed)
    if cfg.init:
        from cellsam.weights import load_model

        loaded = load_model(cfg.init)
        if not cfg.init_weights_only:
            return adopt_data_stain(loaded.train(), cfg.data)  # load_model returns eval mode (dropout off)
        model = build_model(model_config(cfg))
        model.load_state_dict(loaded.state_dict(), strict=True)
        return adopt_data_stain(model, cfg.data)
    return adopt_data_stain(build_model(model_config(cfg)), cfg.data)


def make_loaders(cfg: TrainConfig) -> tuple[DataLoader, DataLoader | None]:
    """Training loader (balanced across sources) and validation loader (None if no val split)."""
    train_ds = PreparedTiles(cfg.data, "train", augment_cfg=cfg.augment, seed=cfg.seed, crop_size=cfg.crop_size,
                             sources=cfg.sources, exclude_sources=cfg.exclude_sources)
    if len(train_ds) == 0:
        raise ValueError(f"no training tiles in {cfg.data}/train")
    sampler = StreamSampler(train_ds, steps=cfg.max_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                            balanced=cfg.balance_sources, balance_power=cfg.source_balance)
    train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                       num_workers=cfg.num_workers, drop_last=True)
    val = None
    if (Path(cfg.data) / "val" / "tiles.json").is_file():
        val_ds = PreparedTiles(cfg.data, "val", augment_cfg=None, max_items=cfg.val_max_tiles,
                               crop_size=cfg.crop_size, sources=cfg.sources, exclude_sources=cfg.exclude_sources,
                               strict_sources=False)
        if len(val_ds):
            val = DataLoader(val_ds, batch_size=cfg.batch_size, collate_fn=collate, num_workers=cfg.num_workers)
    return train, val


class WeightsDigest(Callback):
    """Writes ``rank<R>.sha256`` (digest of all parameters) at the end of fit: proves DDP ranks agree."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        h = hashlib.sha256()
        for name, p in sorted(pl_module.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.sha256").write_text(h.hexdigest())


def averaging(cfg: TrainConfig) -> list[Callback]:
    """The stage's weight-averaging callback, if it asks for one (``ema_decay`` > 0)."""
    if not cfg.ema_decay:
        return []
    from cellsam.train.averaging import WeightEMA

    return [WeightEMA(cfg.ema_decay, start_step=cfg.ema_start_step)]


def train(cfg: TrainConfig, *, resume: bool = False, extra: dict[str, Any] | None = None,
          callbacks: list[Callback] | None = None) -> Path:
    """Run one training stage; returns the path of the exported ``model.safetensors``.

    Writes into ``cfg.output``: ``config.yaml`` (resolved config), ``checkpoints/`` (Lightning,
    for exact resume with ``resume=True``), CSV and TensorBoard logs, and the exported model.
    ``callbacks`` are extra Lightning callbacks (e.g. progress reporting in ``cellsam serve``); with
    ``cfg.ema_decay`` the weight average (:class:`~cellsam.train.averaging.WeightEMA`) comes after them, so
    at the end of training they still see the trained weights before the average replaces them.
    """
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.stage == "size":  # a closed-form fit, no optimiser
        from cellsam.train.size import fit_size_model

        return fit_size_model(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model = set_fast_inference(initial_model(cfg), False)  # a recipe's arithmetic stays the unfused one
    module = CellSAMModule(model, cfg)
    train_loader, val_loader = make_loaders(cfg)
    module.stream_sampler = train_loader.sampler  # resumes where the checkpoint stopped
    strategy: Any = cfg.strategy
    if strategy == "ddp":
        strategy = "ddp_find_unused_parameters_true"  # box prompts leave point embeddings unused
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=cfg.checkpoint_every_steps,
                           save_last=True, save_top_k=-1 if cfg.checkpoint_every_steps else 0)
    trainer = L.Trainer(
        max_steps=cfg.max_steps,
        max_epochs=-1,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=strategy,
        precision=cfg.precision,  # type: ignore[arg-type]
        gradient_clip_val=cfg.optim.clip_norm or None,
        gradient_clip_algorithm="norm",
        log_every_n_steps=cfg.log_every_steps,
        val_check_interval=cfg.val_every_steps or None,
        check_val_every_n_epoch=None if cfg.val_every_steps else 1,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if val_loader is not None else 0,
        logger=[CSVLogger(out, name="logs"), TensorBoardLogger(out, name="tb")],
        callbacks=[ckpt, WeightsDigest(out), *(callbacks or []), *averaging(cfg)],
        use_distributed_sampler=False,  # StreamSampler shards by rank itself
        default_root_dir=out,
        deterministic=False,
        enable_progress_bar=True,
    )
    last = out / "checkpoints" / "last.ckpt"
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(last) if resume and last.is_file() else None)
    dest = out / "model.safetensors"
    if trainer.global_rank == 0:
        from cellsam.weights import save_model

        meta = {"training": cfg.to_dict(), "steps": trainer.global_step, **(extra or {})}
        save_model(module.model, dest, version=cfg.version, metadata=meta)
        (out / "summary.json").write_text(json.dumps(
            {"steps": trainer.global_step, "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}},
            indent=1))
    return dest
