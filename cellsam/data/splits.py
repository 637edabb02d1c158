"""Leak-free train/val/test assignment.

- A source's own split is kept. Otherwise 80/10/10 by a stable hash of ``source/image_id``
  salted with the split seed, so every tile of one image lands in the same split and the
  assignment does not depend on which other images are present.
- Exact and near duplicates across splits (difference hash of each raw channel, 256 bits,
  Hamming distance <= ``max_distance``) are grouped (transitively) and every image of a group
  that spans several splits moves to train. Matching per channel also catches one channel
  reused in two data sets (e.g. a nuclear image labelled for nuclei and for whole cells).
"""

from __future__ import annotations

import hashlib

import numpy as np

SPLITS = ("train", "val", "test")
HASH_SIDE = 16


def hash_split(key: str, *, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """ "train" / "val" / "test" for ``key`` from sha256(seed:key) (uniform in [0, 1))."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def dhash(channel: np.ndarray, *, side: int = HASH_SIDE) -> np.ndarray:
    """Difference hash of an (H, W) image: (side*side,) bool, True where a block-mean pixel is
    brighter than its left neighbour on a (side, side + 1) downscaled image."""
    x = np.asarray(channel, np.float64)
    if x.ndim != 2:
        raise ValueError(f"dhash: expected (H, W), got shape {x.shape}")
    ys = np.linspace(0, x.shape[0], side + 1).astype(int)
    xs = np.linspace(0, x.shape[1], side + 2).astype(int)
    ys[-1], xs[-1] = x.shape[0], x.shape[1]
    csum = np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1)  # integral image -> exact block means
    y0, y1 = ys[:-1], np.maximum(ys[1:], ys[:-1] + 1)
    x0, x1 = xs[:-1], np.maximum(xs[1:], xs[:-1] + 1)
    y1, x1 = np.minimum(y1, x.shape[0]), np.minimum(x1, x.shape[1])
    s = csum[np.ix_(y1, x1)] - csum[np.ix_(y0, x1)] - csum[np.ix_(y1, x0)] + csum[np.ix_(y0, x0)]
    area = np.maximum(np.outer(y1 - y0, x1 - x0), 1)
    small = s / area
    return (small[:, 1:] > small[:, :-1]).ravel()


def duplicate_groups(hashes: list[list[np.ndarray]], *, max_distance: int = 8) -> list[int]:
    """Group images with any pair of channel hashes within ``max_distance`` bits.

    Args:
        hashes: per image, a list of (B,) bool hashes (one per channel).
    Returns:
        group id per image (the smallest image index of its group).
    """
    owner, flat = [], []
    for i, hs in enumerate(hashes):
        for h in hs:
            owner.append(i)
            flat.append(np.asarray(h, bool))
    parent = list(range(len(hashes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if flat:
        bits = np.stack(flat).astype(np.uint8)
        owner_arr = np.asarray(owner)
        for a in range(len(flat)):
            dist = np.count_nonzero(bits[a + 1 :] != bits[a], axis=1)
            for b in np.flatnonzero(dist <= max_distance) + a + 1:
                ra, rb = find(int(owner_arr[a])), find(int(owner_arr[b]))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(len(hashes))]


def resolve_duplicates(splits: list[str], groups: list[int]) -> tuple[list[str], int]:
    """Move every image of a group spanning several splits to train.

    Returns the new split list and the number of images moved.
    """
    members: dict[int, set[str]] = {}
    for s, g in zip(splits, groups, strict=True):
        members.setdefault(g, set()).add(s)
    out, moved = [], 0
    for s, g in zip(splits, groups, strict=True):
        if len(members[g]) > 1 and s != "train":
            out.append("train")
            moved += 1
        else:
            out.append(s)
    return out, moved


def select_sources(tile_sources: list[str], *, include: tuple[str, ...] | list[str] = (),
                   exclude: tuple[str, ...] | list[str] = (), strict: bool = True) -> list[int]:
    """Indices of the tiles whose source is kept: in ``include`` (empty: every source) and not in ``exclude``.

    For specialist models (``include=("dsb2018",)``) and leave-one-source-out runs
    (``exclude=("monuseg",)``). With ``strict`` a name that is not one of the sources raises, listing
    those present, so a typo cannot silently train on everything; so does a filter that keeps no tile.
    ``strict=False`` (a validation split that may lack a source) ignores unknown names and may return [].
    """
    present = sorted(set(tile_sources))
    unknown = sorted((set(include) | set(exclude)) - set(present))
    if unknown and strict:
        raise ValueError(f"unknown source(s) {unknown}; this split has {present}")
    keep = [i for i, s in enumerate(tile_sources) if (not include or s in include) and s not in exclude]
    if not keep and strict and (include or exclude):
        raise ValueError(f"no tile left after include={list(include)} exclude={list(exclude)} (sources {present})")
    return keep
