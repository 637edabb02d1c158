"""Training samples from a prepared dataset (``cellsam prepare`` output, see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from cellsam.data.prepare import dataset_stain_grey
from cellsam.data.splits import select_sources
from cellsam.train.targets import labels_to_targets
from cellsam.train.transforms import AugmentConfig, augment


class PreparedTiles(Dataset):
    """Tiles of one split: ``images.npy`` (N,3,T,T) float32, ``labels.npy`` (N,1,T,T) int32, ``tiles.json``.

    Each item is ``(image (3,T,T) float32, target)`` where target holds ``labels_image`` (T,T) int64
    and the detection targets of :func:`~cellsam.train.targets.labels_to_targets`. With an
    ``augment`` config, augmentation is seeded by (seed, stream position, index): reproducible.
    ``sources`` / ``exclude_sources`` keep only some sources' tiles (specialists, leave-one-source-out;
    see :func:`~cellsam.data.splits.select_sources`, ``strict_sources``); ``max_items`` then takes the
    first tiles kept.
    """

    def __init__(self, root: str | Path, split: str, *, augment_cfg: AugmentConfig | None = None, seed: int = 0,
                 max_items: int | None = None, crop_size: int | None = None, sources: tuple[str, ...] = (),
                 exclude_sources: tuple[str, ...] = (), strict_sources: bool = True) -> None:
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
        self.index = select_sources([t.get("source", "?") for t in self.tiles], include=sources,
                                    exclude=exclude_sources, strict=strict_sources)
        if max_items is not None:
            self.index = self.index[:max_items]
        self.n = len(self.index)
        self.augment_cfg = augment_cfg
        self.crop_size = crop_size
        self.seed = seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Tile ``key % len(self)``; ``key // len(self)`` is its position in the training stream,
        which seeds the augmentation (see :class:`StreamSampler`)."""
        i, position = key % self.n, key // self.n
        g = torch.Generator().manual_seed(hash((self.seed, position, i)) & 0x7FFFFFFF)
        i = self.index[i]
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

    def source_weights(self, power: float = 1.0) -> list[float]:
        """Per-tile sampling weight ``n_s ** -power`` (``n_s``: tiles of its source).

        Source s is then drawn with probability proportional to ``n_s ** (1 - power)``: power 1 draws
        every source equally often, 0.5 by the square root of its size, 0 every tile equally.
        """
        sources = [self.tiles[j].get("source", "?") for j in self.index]
        counts = Counter(sources)
        return [counts[s] ** -power for s in sources]


class StreamSampler(Sampler[int]):
    """The whole run's sample stream, fixed by the seed, so that training resumes exactly.

    Position ``p`` of the stream (0 <= p < ``total``) is tile ``idx[p]``, drawn with per-source
    balanced weights (each source equally often, with replacement) or as shuffled passes over all
    tiles. Keys are ``p * n_items + idx[p]`` (the dataset decodes both). After a restart,
    ``start_step`` (set from the checkpoint's global step) skips what was consumed. Under DDP,
    rank r of W takes positions r, r+W, ...: no Lightning sampler wrapping is needed.
    """

    def __init__(self, ds: PreparedTiles, *, steps: int, batch_size: int, seed: int, balanced: bool,
                 balance_power: float = 1.0) -> None:
        self.n_items = len(ds)
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.weights = torch.tensor(ds.source_weights(balance_power), dtype=torch.float64) if balanced else None
        self.start_step = 0

    def _world(self) -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _indices(self, total: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        if self.weights is not None:
            return torch.multinomial(self.weights, total, replacement=True, generator=g)
        passes = -(-total // self.n_items)
        return torch.cat([torch.randperm(self.n_items, generator=g) for _ in range(passes)])[:total]

    def __iter__(self) -> Iterator[int]:
        rank, world = self._world()
        total = self.steps * self.batch_size * world
        idx = self._indices(total).tolist()
        for p in range(self.start_step * self.batch_size * world + rank, total, world):
            yield p * self.n_items + idx[p]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.batch_size


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """Stack images (B,3,T,T); keep targets as a list (variable numbers of cells)."""
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]


def adopt_data_stain(model: Any, data: str | Path) -> Any:
    """``model`` with ``cfg.inference.stain_grey`` set to how ``data`` was prepared
    (:func:`cellsam.data.prepare.dataset_stain_grey`): a model prepares a user's stained colour pictures as
    the pictures it was trained on were. Returns the same model object."""
    import dataclasses

    stain = dataset_stain_grey(data)
    if model.cfg.inference.stain_grey != stain:
        model.cfg = model.cfg.replace(inference=dataclasses.replace(model.cfg.inference, stain_grey=stain))
    return model
