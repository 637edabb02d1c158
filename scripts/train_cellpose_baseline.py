"""Train the Cellpose 3 generalist baseline from scratch on the prepared training tiles.

    PYTHONPATH=/tmp/cp3 OMP_NUM_THREADS=2 python scripts/train_cellpose_baseline.py prepared \\
        -o runs/cellpose_budget --epochs 72 --nimg-per-epoch 64 --max-tiles 982 --save-every 8

The paper's recipe (SGD, momentum 0.9, lr 0.1 with a 10-epoch warm-up, weight decay 1e-4, batch 8,
channels blue + green) with fewer optimiser steps: on the 2-core CPU one step of batch 8 takes about
7.7 s with 2 threads (15 s on one), so the number of steps is what the CPU budget allows (the command
above: 576 steps in 74 min, our default model's budget) (see the run's JSON record:
wall and CPU seconds). Cellpose 3 is installed beside the package (README, "Evaluate").
"""

from __future__ import annotations

import argparse
import logging

from cellsam.eval.baselines import train_cellpose


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prepared")
    ap.add_argument("-o", "--out", default="runs/cellpose_generalist")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--nimg-per-epoch", type=int, default=64)
    ap.add_argument("--max-tiles", type=int, default=400, help="tiles held in memory with their flows (~9 MB each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sources", nargs="+", default=(), help="train on these sources only (a specialist)")
    ap.add_argument("--exclude-sources", nargs="+", default=(), help="leave these sources out")
    ap.add_argument("--save-every", type=int, default=None, help="also save every N epochs (default: at the end)")
    ap.add_argument("--init", default=None, help="fine-tune this Cellpose model file (default: from scratch)")
    ap.add_argument("--name", default="cellpose_generalist", help="model name: OUT/models/NAME, OUT/NAME.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    path = train_cellpose(args.prepared, args.out, epochs=args.epochs, nimg_per_epoch=args.nimg_per_epoch,
                          max_tiles=args.max_tiles, seed=args.seed,
                          save_every=args.save_every, sources=tuple(args.sources),
                          exclude_sources=tuple(args.exclude_sources), init=args.init, name=args.name)
    print("model written to", path)


if __name__ == "__main__":
    main()
