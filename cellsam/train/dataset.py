"""Training samples from a prepared dataset (``cellsam prepare`` output, see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, WeightedRandomSampler

from cellsam.train.targets import labels_to_targets
from cellsam.train.transforms import AugmentConfig, augment


class PreparedTiles(Dataset):
    """Tiles of one split: ``images.npy`` (N,3,T,T) float32, ``labels.npy`` (N,1,T,T) int32, ``tiles.json``.

    Each item is ``(image (3,T,T) float32, target)`` where target holds ``labels_image`` (T,T) int64
    and the detection targets of :func:`~cellsam.train.targets.labels_to_targets`. With an
    ``augment`` config, augmentation is seeded by (seed, epoch, index) so runs are reproducible.
    """

    def __init__(self, root: str | Path, split: str, *, augment_cfg: AugmentConfig | None = None, seed: int = 0,
                 max_items: int | None = None, crop_size: int | None = None) -> None:
        d = Path(root) / split
        missing = [n for n in ("images.npy", "labels.npy", "tiles.json") if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{d} is not a prepared split (missing {', '.join(missing)}); run `cellsam prepare`"
            )
        self.images = np.load(d / "images.npy", mmap_mode="r")
        self.labels = np.load(d / "labels.npy", mmap_mode="r")
        self.tiles: list[dict[str, Any]] = json.loads((d / "tiles.json").read_text())
        if not (len(self.images) == len(self.labels) == len(self.tiles)):
            raise ValueError(f"{d}: images, labels and tiles.json disagree on the number of tiles")
        self.n = len(self.tiles) if max_items is None else min(max_items, len(self.tiles))
        self.augment_cfg = augment_cfg
        self.crop_size = crop_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFFFFFF)
        training = self.augment_cfg is not None and self.augment_cfg.enabled
        y0, x0, c = self._crop_window(i, g, random=training)
        image = torch.from_numpy(np.array(self.images[i, :, y0 : y0 + c, x0 : x0 + c], dtype=np.float32))
        labels = torch.from_numpy(np.array(self.labels[i, 0, y0 : y0 + c, x0 : x0 + c], dtype=np.int64))
        if training:
            assert self.augment_cfg is not None
            image, labels = augment(image, labels, self.augment_cfg, g)
        target = labels_to_targets(labels)
        target["labels_image"] = labels
        return image, target

    def _crop_window(self, i: int, g: torch.Generator, *, random: bool) -> tuple[int, int, int]:
        """(y0, x0, side) of the crop of tile ``i``: random when training, centred otherwise.

        A random crop prefers windows that contain cells (up to 5 draws).
        """
        t = self.images.shape[-1]
        c = t if self.crop_size is None else min(self.crop_size, t)
        if c == t:
            return 0, 0, t
        if not random:
            return (t - c) // 2, (t - c) // 2, c
        for _ in range(5):
            y0, x0 = (int(v) for v in torch.randint(0, t - c + 1, (2,), generator=g))
            if self.labels[i, 0, y0 : y0 + c, x0 : x0 + c].any():
                break
        return y0, x0, c

    def source_weights(self) -> list[float]:
        """Per-tile sampling weight 1/len(its source): each source is drawn equally often."""
        sources = [t.get("source", "?") for t in self.tiles[: self.n]]
        counts = Counter(sources)
        return [1.0 / counts[s] for s in sources]


def balanced_sampler(ds: PreparedTiles, *, num_samples: int, seed: int) -> WeightedRandomSampler:
    """Dataset-balanced sampling across sources (with replacement, ``num_samples`` per epoch)."""
    g = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(ds.source_weights(), num_samples=num_samples, replacement=True, generator=g)


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Stack images (B,3,T,T); keep targets as a list (variable numbers of cells)."""
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]
