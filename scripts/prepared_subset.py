"""A small prepared dataset made of the first tiles of each source of a split (for overfit tests).

    python scripts/prepared_subset.py prepared runs/overfit8 --take dsb2018=6 deepcell1=1 monuseg=1

Writes the chosen tiles as both ``train`` and ``val`` of OUT (an overfit test scores on what it
trained on), with ``dataset.json`` copied.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prepared", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--split", default="train")
    ap.add_argument("--take", nargs="+", required=True, metavar="SOURCE=N")
    args = ap.parse_args()
    src = args.prepared / args.split
    tiles = json.loads((src / "tiles.json").read_text())
    index: list[int] = []
    for item in args.take:
        name, _, n = item.partition("=")
        chosen = [i for i, t in enumerate(tiles) if t.get("source") == name][: int(n)]
        if len(chosen) < int(n):
            raise SystemExit(f"{name}: asked for {n} tiles, the split has {len(chosen)}")
        index += chosen
    images = np.load(src / "images.npy", mmap_mode="r")
    labels = np.load(src / "labels.npy", mmap_mode="r")
    for split in ("train", "val"):
        d = args.out / split
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / "images.npy", np.array(images[index]))
        np.save(d / "labels.npy", np.array(labels[index]))
        (d / "tiles.json").write_text(json.dumps([tiles[i] for i in index]))
    shutil.copy(args.prepared / "dataset.json", args.out / "dataset.json")
    print(f"{len(index)} tiles {index} -> {args.out}")


if __name__ == "__main__":
    main()
