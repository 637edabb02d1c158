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
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from cellsam.eval.baselines import load_training_tiles, require_cellpose

log = logging.getLogger("train_cellpose_baseline")

PAPER_RECIPE = {"optimizer": "SGD", "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 8,
                "learning_rate": 0.1, "warmup_epochs": 10, "epochs": 300, "channels": [3, 2]}


def train_cellpose(prepared_dir: str | Path, out: str | Path, *, epochs: int, nimg_per_epoch: int | None = None,
                   max_tiles: int | None = None, batch_size: int = 8, learning_rate: float = 0.1,
                   weight_decay: float = 1e-4, bsize: int = 224, min_train_masks: int = 1, seed: int = 0,
                   name: str = "cellpose_generalist", device: str = "cpu", save_every: int | None = None,
                   sources: tuple[str, ...] = (), exclude_sources: tuple[str, ...] = (),
                   init: str | Path | None = None) -> Path:
    """Train a Cellpose 3 CPnet on prepared training tiles, from scratch or from ``init``.

    Args:
        prepared_dir: ``cellsam prepare`` output; its ``train`` tiles are used.
        out: output folder; the model is saved as ``out/models/<name>`` and a record of the run (recipe,
            tiles, wall / CPU seconds, versions) as ``out/<name>.json``.
        epochs: Cellpose epochs (the paper: 300).
        nimg_per_epoch: images sampled per epoch (None = all tiles): with ``epochs`` it sets the number
            of optimiser steps, ``epochs * nimg_per_epoch / batch_size``.
        max_tiles: use a random subset of the training tiles (flows are computed for every tile used, up
            front, and all are held in memory: about 9 MB per 512-px tile).
        batch_size, learning_rate, weight_decay: the paper's recipe by default (SGD, momentum 0.9).
        bsize: crop size of the training patches (Cellpose default 224).
        min_train_masks: tiles with fewer cells are skipped by Cellpose.
        device: "cpu" or "cuda".
        save_every: also save the model every this many epochs, over the same file (None: only at
            the end), so a run cut short by its time budget leaves a usable model.
        sources, exclude_sources: train on some sources only (a specialist, a leave-one-source-out run).
        init: a model file from an earlier run to fine-tune (None: random weights, as the paper's
            from-scratch baseline). The warm-up and learning rate are the same either way.

    Returns:
        path of the saved model (pass it to :func:`cellpose_predict` or ``--baseline cellpose:PATH``).
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if nimg_per_epoch is not None and nimg_per_epoch < 1:
        raise ValueError(f"nimg_per_epoch must be >= 1, got {nimg_per_epoch}")
    if save_every is not None and save_every < 1:
        raise ValueError(f"save_every must be >= 1, got {save_every}")
    if init is not None and not Path(init).is_file():
        raise FileNotFoundError(f"Cellpose model to start from not found: {init}")
    cellpose = require_cellpose()
    import torch
    from cellpose import models, train

    out = Path(out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    images, labels, index = load_training_tiles(prepared_dir, max_tiles=max_tiles, seed=seed, sources=sources,
                                                exclude_sources=exclude_sources)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = models.CellposeModel(gpu=device != "cpu", pretrained_model=str(init) if init is not None else False,
                                 device=torch.device(device))
    model_path, train_losses, _ = train.train_seg(
        model.net, train_data=images, train_labels=labels, channels=[3, 2], channel_axis=0,
        batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay, SGD=True,
        n_epochs=epochs, nimg_per_epoch=nimg_per_epoch, bsize=bsize, min_train_masks=min_train_masks,
        save_path=str(out), model_name=name, save_every=save_every or max(epochs, 1),
    )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    n_used = nimg_per_epoch if nimg_per_epoch is not None else len(images)
    record = {
        "model": str(model_path),
        "prepared": str(Path(prepared_dir).resolve()),
        "tiles_available": int(len(np.load(Path(prepared_dir) / "train" / "images.npy", mmap_mode="r"))),
        "tiles_used": len(index),
        "sources": list(sources) or "all",
        "exclude_sources": list(exclude_sources),
        "init": str(init) if init is not None else None,
        "recipe": {"optimizer": "SGD", "momentum": 0.9, "weight_decay": weight_decay, "batch_size": batch_size,
                   "learning_rate": learning_rate, "warmup_epochs": 10, "epochs": epochs,
                   "nimg_per_epoch": n_used, "optimizer_steps": int(epochs * -(-n_used // batch_size)),
                   "bsize": bsize, "channels": [3, 2], "schedule": "cellpose.train.train_seg"},
        "paper_recipe": PAPER_RECIPE,
        "final_train_loss": float(train_losses[-1]) if len(train_losses) else None,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cellpose_version": str(getattr(cellpose, "version", "?")),
        "device": device,
    }
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    log.info("Cellpose baseline: %s (%.0f s wall, %.0f s CPU)", model_path, wall, cpu)
    return Path(model_path)




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
