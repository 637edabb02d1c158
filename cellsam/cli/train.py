"""``cellsam train --config configs/NAME.yaml [--set key=value ...] [--resume]`` (one stage or a recipe)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from cellsam.train.config import load_train_configs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (one stage) from a YAML config",
                       description="Train CellSAM. Every hyper-parameter is in the YAML config; "
                                   "--set overrides single keys (dotted, e.g. optim.lr_head=2e-4).")
    p.add_argument("--config", required=True, help="YAML training config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); values are parsed as YAML")
    p.add_argument("--output-root", help="write every stage under this folder (OUTPUT_ROOT/<stage folder name>)")
    p.add_argument("--init", help="start from this checkpoint (ours, Meta SAM .pth or official CellSAM .pt)")
    p.add_argument("--resume", action="store_true", help="resume from OUTPUT/checkpoints/last.ckpt")
    p.add_argument("--skip-done", action="store_true",
                   help="continue a recipe: skip the last stage whose OUTPUT/model.safetensors exists and "
                        "every stage before it (a later stage starts from the earlier stage's model)")
    p.set_defaults(func=run)


def first_stage_to_run(configs: list) -> int:
    """Index of the first stage a ``--skip-done`` run trains: the one after the last stage whose
    ``OUTPUT/model.safetensors`` exists (0 when none does; ``len(configs)`` when the last one does).

    A finished later stage implies its predecessors: each stage starts from the one before it, so
    their intermediate files need not be kept (e.g. a recipe that continues a shipped model)."""
    done = [i for i, cfg in enumerate(configs) if (Path(cfg.output) / "model.safetensors").is_file()]
    return done[-1] + 1 if done else 0


def run(args: argparse.Namespace) -> int:
    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = yaml.safe_load(v)
    if args.init:
        overrides["init"] = args.init
    from cellsam.train.run import make_loaders, train

    try:
        configs = load_train_configs(args.config, overrides, output_root=args.output_root)
        for cfg in configs:  # every stage's data and source selection, before an hour of training
            make_loaders(cfg)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        print(f"cellsam train: {e}", file=sys.stderr)
        return 2
    first = first_stage_to_run(configs) if args.skip_done else 0
    for i, cfg in enumerate(configs):
        if i < first:
            print(f"stage {i + 1}/{len(configs)}: {cfg.stage}: done ({configs[first - 1].output}/model.safetensors "
                  f"exists), skipped (--skip-done)")
            continue
        print(f"stage {i + 1}/{len(configs)}: {cfg.stage} -> {cfg.output}")
        path = train(cfg, resume=args.resume)
        print(f"model written to {path}")
    return 0
