"""Does flip test-time augmentation of the dense CellFinder help? (CenterNet's "flip test".)

    python scripts/flip_tta_study.py FLIPS -- EVALUATE_ARGS...     # run from the repo root

FLIPS: ``h`` (the image and its left-right mirror), ``hv`` (+ its up-down mirror) or ``hvd`` (+ both).
Every call of the model's ``detect`` then runs the detector trunk on the mirrored images too, mirrors the
maps back (heatmap probabilities and log sizes averaged; an x offset ``o`` of a mirrored map is ``1 - o``
here, since a centre at ``x / stride = j + o`` lands at ``(w - 1 - j) + (1 - o)`` in the mirror) and
decodes the mean maps as usual. The masks still come from the one embedding of the image as it is.
EVALUATE_ARGS are passed to ``cellsam evaluate`` unchanged, so the report is comparable with the same
command without TTA. A maintainer script for #18, not part of the package.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from cellsam.cli import main as cli_main
from cellsam.models.cellsam import CellSAM
from cellsam.models.conv_encoder import ConvEncoder
from cellsam.models.dense_finder import DenseCellFinder
from cellsam.models.image_encoder import EncoderOutput

FLIP_SETS: dict[str, tuple[tuple[int, ...], ...]] = {
    "h": ((-1,),),
    "hv": ((-1,), (-2,)),
    "hvd": ((-1,), (-2,), (-2, -1)),
}


def unflip(maps: dict[str, Tensor], dims: tuple[int, ...]) -> dict[str, Tensor]:
    """Maps of a mirrored image -> maps of the image (heatmap as probabilities)."""
    heat = maps["heatmap"].float().sigmoid().flip(dims)
    size = maps["size"].float().flip(dims)
    off = maps["offset"].float().flip(dims).clone()
    if -1 in dims:
        off[:, 0] = 1.0 - off[:, 0]
    if -2 in dims:
        off[:, 1] = 1.0 - off[:, 1]
    return {"heatmap": heat, "size": size, "offset": off}


def tta_detect(flips: tuple[tuple[int, ...], ...]) -> Any:
    original = CellSAM.detect

    def detect(self: CellSAM, enc: EncoderOutput, images: Tensor | None = None) -> dict[str, Any]:
        out = original(self, enc, images)
        if images is None or not isinstance(self.cellfinder, DenseCellFinder) \
                or not isinstance(self.image_encoder, ConvEncoder) or self.detector_trunk is not None:
            return out
        views = [unflip(out, ())]
        with torch.no_grad():
            for dims in flips:
                trunk = self.image_encoder.forward_trunk(images.flip(dims))
                views.append(unflip(self.cellfinder(trunk), dims))
        prob = torch.stack([v["heatmap"] for v in views]).mean(0).clamp(1e-6, 1 - 1e-6)
        return {"heatmap": torch.logit(prob), "size": torch.stack([v["size"] for v in views]).mean(0),
                "offset": torch.stack([v["offset"] for v in views]).mean(0)}

    return detect


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[1] not in FLIP_SETS or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    CellSAM.detect = tta_detect(FLIP_SETS[sys.argv[1]])  # type: ignore[method-assign]
    return cli_main(["evaluate", *sys.argv[3:]])


if __name__ == "__main__":
    sys.exit(main())
