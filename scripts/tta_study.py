"""Flip test-time augmentation of the dense CellFinder, measured on a prepared split.

    python scripts/tta_study.py MODEL --data prepared --split val [--flips 4] [--json out.json]

The model's detector runs on the tile and on its mirror images (``--flips`` 2: + left-right; 4: + up-down
and both); each output is mapped back (heatmap and log-size maps mirrored, the sub-pixel offset o of a
mirrored axis becoming 1 - o) and the maps are averaged (heatmap as probabilities) before peak picking.
The mask decoder still sees the one embedding of the tile. Scores the pipeline (``cellsam evaluate``'s
tables) with and without. A maintainer script for the detector study (#18), not part of the package.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Any

import torch

from cellsam.eval.harness import cellsam_method, evaluate_methods, format_tables, load_prepared
from cellsam.weights import load_model

FLIPS = ((), (-1,), (-2,), (-2, -1))


def unflip(out: dict[str, torch.Tensor], dims: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Map dense outputs of a mirrored input (flipped along ``dims``) back to the input's frame."""
    if not dims:
        return out
    heat, size, off = (out[k].flip(dims) for k in ("heatmap", "size", "offset"))
    off = off.clone()
    if -1 in dims:
        off[:, 0] = 1.0 - off[:, 0]
    if -2 in dims:
        off[:, 1] = 1.0 - off[:, 1]
    return {"heatmap": heat, "size": size, "offset": off}


def with_flip_tta(net: Any, n_flips: int) -> Any:
    """``net`` with its ``detect`` replaced by the flip-averaged one."""
    plain = net.detect

    def detect(self: Any, enc: Any, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        assert images is not None
        outs = [plain(enc, images)]
        for dims in FLIPS[1:n_flips]:
            flipped = images.flip(dims)
            outs.append(unflip(plain(self.encode(flipped), flipped), dims))
        prob = torch.stack([o["heatmap"].float().sigmoid() for o in outs]).mean(0).clamp(1e-6, 1 - 1e-6)
        return {"heatmap": prob.logit(), "size": torch.stack([o["size"] for o in outs]).mean(0),
                "offset": torch.stack([o["offset"] for o in outs]).mean(0)}

    net.detect = types.MethodType(detect, net)
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", default="prepared")
    ap.add_argument("--split", default="val")
    ap.add_argument("--flips", type=int, default=4, choices=(2, 4))
    ap.add_argument("--box-threshold", type=float, nargs="*", default=[])
    ap.add_argument("--no-plain", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    items = load_prepared(a.data, a.split)
    methods = {} if a.no_plain else {"plain": cellsam_method(load_model(a.model).eval())}
    tta = with_flip_tta(load_model(a.model).eval(), a.flips)
    for t in a.box_threshold or [None]:
        name = f"tta{a.flips}" + ("" if t is None else f"@{t:g}")
        methods[name] = cellsam_method(tta, box_threshold=t)
    report = evaluate_methods(items, methods, progress=False)
    print(format_tables(report))
    if a.json:
        a.json.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
