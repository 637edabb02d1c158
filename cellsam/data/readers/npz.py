"""TissueNet-style ``.npz`` files: ``X`` (N, H, W, C) images and ``y`` (N, H, W, C') labels.

Image channels: C = 2 is (nuclear, whole-cell) as in TissueNet; C = 1 is one channel.
Label channel: ``y[..., 0]`` is whole-cell and ``y[..., 1]`` nuclear (TissueNet's order); the
``target`` argument picks one (default whole-cell); a 1-channel ``y`` is used as is.
The split is taken from the file name when it contains ``train``, ``val`` or ``test``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cellsam.data.sample import Role, Sample, SampleError, check_labels


def find_files(root: Path) -> list[Path]:
    """``.npz`` files: ``root`` itself or those under it, sorted."""
    root = Path(root)
    return [root] if root.is_file() else sorted(root.rglob("*.npz"))


def split_from_name(name: str) -> str | None:
    """ "train" / "val" / "test" when the file name says so (``validation`` counts as val)."""
    m = re.search(r"(?:^|[^a-z])(train|val|validation|test)(?:[^a-z]|$)", name.lower())
    if not m:
        return None
    return {"validation": "val"}.get(m.group(1), m.group(1))


def read_npz(root: Path, *, target: str | None = None) -> Iterator[Sample | SampleError]:
    """Yield one :class:`Sample` per image in each ``.npz`` file."""
    root = Path(root)
    files = find_files(root)
    if not files:
        yield SampleError(root, "no .npz files found")
        return
    base = root.parent
    for f in files:
        try:
            with np.load(f, allow_pickle=False) as z:
                if "X" not in z or "y" not in z:
                    raise SampleError(f, f"expected arrays 'X' and 'y', found {sorted(z.files)}")
                X, y = z["X"], z["y"]
        except SampleError as e:
            yield e
            continue
        except Exception as e:  # noqa: BLE001 - any decoder error means an unreadable file
            yield SampleError(f, f"cannot read .npz ({type(e).__name__}: {e})")
            continue
        if X.ndim == 3:
            X = X[..., None]
        if y.ndim == 3:
            y = y[..., None]
        if X.ndim != 4 or y.ndim != 4 or X.shape[:3] != y.shape[:3]:
            yield SampleError(f, f"X {X.shape} and y {y.shape} must be (N, H, W, C) with equal N, H, W")
            continue
        if X.shape[-1] not in (1, 2):
            yield SampleError(f, f"X must have 1 or 2 channels (nuclear, whole-cell), got {X.shape[-1]}")
            continue
        ych = 1 if (target == "nuclear" and y.shape[-1] > 1) else 0
        roles: tuple[Role, ...] = ("nuclear", "whole-cell") if X.shape[-1] == 2 else ("whole-cell",)
        rel = f.relative_to(base).as_posix() if f.is_relative_to(base) else f.name
        for i in range(X.shape[0]):
            try:
                labels = check_labels(y[i, ..., ych], Path(f"{f}[{i}]"), X.shape[1:3])
            except SampleError as e:
                yield e
                continue
            yield Sample(
                image=np.moveaxis(X[i], -1, 0),
                labels=labels,
                roles=roles,
                source=root.stem if root.is_file() else root.name,
                image_id=f"{rel}/{i}",
                path=f"{rel}/{i}",
                files={"npz": str(f), "index": str(i)},
                split=split_from_name(f.stem),
                target="nuclear" if ych == 1 else ("whole-cell" if y.shape[-1] > 1 else "unknown"),
            )
