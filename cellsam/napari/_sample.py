"""npe2 sample data: the nuclei image bundled with cellsam (``cellsam segment --sample``)."""

from __future__ import annotations

from typing import Any

from cellsam.napari._reader import read


def nuclei_sample() -> list[tuple[Any, dict[str, Any], str]]:
    from cellsam.cli.segment import sample_path

    return read(str(sample_path()))
