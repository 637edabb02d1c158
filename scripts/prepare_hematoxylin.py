"""Study arm v9 (#18): ``cellsam prepare`` with stained bright-field colour pictures (H&E and DSB's other
stains) converted to their hematoxylin channel instead of inverted luminance.

    python scripts/prepare_hematoxylin.py ../shared/data/dsb2018 ../shared/data/deepcell1 \
        ../shared/data/monuseg -o prepared_hed

Everything else is ``cellsam prepare``'s: the readers call
:func:`cellsam.data.sample.image_to_channels`, whose RGB rule is run here with
``rgb_to_channel(..., stain="hematoxylin")``. Grey pictures and fluorescence composites are unchanged.
"""

from __future__ import annotations

import functools
import sys

import cellsam.data.sample as sample
from cellsam.cli import main
from cellsam.data.normalize import rgb_to_channel


def run(argv: list[str]) -> int:
    """Run ``cellsam prepare`` with the hematoxylin rule; returns its exit status."""
    sample.rgb_to_channel = functools.partial(rgb_to_channel, stain="hematoxylin")
    return main(["prepare", *argv])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
