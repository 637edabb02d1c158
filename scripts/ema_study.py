"""Weight-EMA study (#18): run one stage of a recipe again from a trained model, with a weight EMA, and keep
both the EMA (``model.safetensors``, what the stage exports) and the raw weights of the same run
(``raw.safetensors``), for ``cellsam evaluate`` to score side by side (a paired comparison: one run, one
sample stream).

    python scripts/ema_study.py --config configs/cpu_v12.yaml --stage 9 --init default --steps 600 \\
        --decay 0.99 --out runs/ema_study
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from cellsam.train.config import load_train_configs
from cellsam.train.run import train
from cellsam.weights import save_model


class SaveRaw(Callback):
    """Writes the trained (not averaged) weights when training ends, before the EMA replaces them."""

    def __init__(self, path: Path, version: str) -> None:
        self.path, self.version = path, version

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        save_model(pl_module.model, self.path, version=self.version,
                   metadata={"steps": trainer.global_step, "weights": "raw (no EMA)"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--stage", type=int, required=True, help="1-based index of the stage in the recipe")
    ap.add_argument("--init", required=True, help="the model to start from (weights name or file)")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--decay", type=float, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    stages = load_train_configs(args.config)
    if not 1 <= args.stage <= len(stages) or stages[args.stage - 1].stage == "size":
        print(f"--stage must name a trained stage of the {len(stages)} in {args.config}", file=sys.stderr)
        return 2
    out = Path(args.out)
    cfg = dataclasses.replace(stages[args.stage - 1], init=args.init, output=str(out), max_steps=args.steps,
                              ema_decay=args.decay, ema_start_step=0, checkpoint_every_steps=0,
                              version="ema_study")
    path = train(cfg, callbacks=[SaveRaw(out / "raw.safetensors", "ema_study_raw")])
    print(f"EMA: {path}\nraw: {out / 'raw.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
