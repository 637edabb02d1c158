"""One file per channel: ``<name>_phase.tif`` and/or ``<name>_nuclear.tif`` + ``<name>_masks.tif``.

Channel files recognised (by suffix): ``_nuclear`` (role nuclear) and one whole-cell channel,
the first present of ``_phase, _wholecell, _membrane, _cytoplasm, _brightfield``. The primary
path of a sample (its id in manifests) is the whole-cell channel file if present, else the
nuclear one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cellsam.data.normalize import StainGrey
from cellsam.data.sample import IMAGE_EXTS, Role, Sample, SampleError, check_labels, image_to_channels, load_array

MASK_TAG = "_masks"
NUCLEAR_TAGS = ("_nuclear",)
WHOLECELL_TAGS = ("_phase", "_wholecell", "_membrane", "_cytoplasm", "_brightfield")


def _find(folder: Path, name: str, tags: tuple[str, ...]) -> Path | None:
    for tag in tags:
        hits = sorted(p for p in folder.glob(f"{name}{tag}.*") if p.suffix.lower() in IMAGE_EXTS)
        if hits:
            return hits[0]
    return None


def find_names(root: Path) -> list[Path]:
    """Label files ``*_masks.*`` under ``root`` that have at least one channel file."""
    out = []
    for m in sorted(root.rglob(f"*{MASK_TAG}.*")):
        if m.suffix.lower() not in IMAGE_EXTS or not m.stem.endswith(MASK_TAG):
            continue
        name = m.stem[: -len(MASK_TAG)]
        if _find(m.parent, name, NUCLEAR_TAGS + WHOLECELL_TAGS) is not None:
            out.append(m)
    return out


def _channel(path: Path, stain: StainGrey) -> np.ndarray:
    img = image_to_channels(load_array(path), path, stain)
    if img.shape[0] != 1:
        raise SampleError(path, f"expected a single-channel image, got {img.shape[0]} channels")
    return img[0]


def read_multichannel(root: Path, *, stain: StainGrey = "luminance") -> Iterator[Sample | SampleError]:
    """Yield one :class:`Sample` per ``<name>_masks.*`` file with its channel files."""
    root = Path(root)
    masks = find_names(root)
    if not masks:
        yield SampleError(root, "no '<name>_masks.*' with '<name>_phase.*' / '<name>_nuclear.*' found")
        return
    for mask_path in masks:
        name = mask_path.stem[: -len(MASK_TAG)]
        nuc = _find(mask_path.parent, name, NUCLEAR_TAGS)
        whole = _find(mask_path.parent, name, WHOLECELL_TAGS)
        try:
            chans: list[np.ndarray] = []
            roles: list[Role] = []
            files: dict[str, str] = {}
            channel_files: tuple[tuple[Path | None, Role], ...] = ((nuc, "nuclear"), (whole, "whole-cell"))
            for p, role in channel_files:
                if p is not None:
                    chans.append(_channel(p, stain))
                    roles.append(role)
                    files[role] = str(p)
            shapes = {c.shape for c in chans}
            if len(shapes) != 1:
                raise SampleError(mask_path.parent / name, f"channel files differ in size: {sorted(shapes)}")
            labels = check_labels(load_array(mask_path), mask_path, chans[0].shape)
        except SampleError as e:
            yield e
            continue
        primary = whole if whole is not None else nuc
        assert primary is not None  # find_names guarantees one channel
        files["labels"] = str(mask_path)
        yield Sample(
            image=np.stack(chans),
            labels=labels,
            roles=tuple(roles),
            source=root.name,
            image_id=(mask_path.parent.relative_to(root) / name).as_posix(),
            path=primary.relative_to(root.parent).as_posix(),
            files=files,
        )
