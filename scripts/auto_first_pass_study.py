"""Where should ``diameter="auto"`` make its first pass? The size model's scale (today) or the model's own?

    python scripts/auto_first_pass_study.py [SCALE]      # SCALE: 1 (default), 0.5 or 2; run from the repo root

Two ways to segment each image of the prepared ``val`` split (``prepared_hed``), resized by SCALE as
``scripts/scale_study.py`` does, with the shipped default model:

* ``auto``: ``segment(..., diameter="auto")`` as shipped: the first pass at the scale the size model
  estimates, a second at the scale its cells measure when that is more than 1.3x away;
* ``native_first``: the first pass at the model's own scale (``diameter=None``), then, as above, a second at
  the scale its cells measure when that is more than 1.3x away (:func:`cellsam.inference.scale.rescale_from_cells`).
  No size model.

Prints the F1@0.5 mean per source, the summed seconds of each way and how many images took a second pass;
at SCALE 1 also both ways on the dense 512 px DSB crop of ``cellsam bench``. A maintainer script for #18 (the
speed of auto on small nuclei), not part of the package.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from cellsam.bench.real import real_scene
from cellsam.eval.harness import load_prepared
from cellsam.eval.metrics import evaluate_labels
from cellsam.inference.scale import rescale_from_cells
from cellsam.inference.segment import Segmentation, segment
from cellsam.models.protocol import inference_defaults
from cellsam.weights import load_model

sys.path.insert(0, "scripts")
from scale_study import rescale_pair  # noqa: E402


def f1(gt: np.ndarray, labels: np.ndarray) -> float:
    return float(evaluate_labels([gt], [labels], deepcell=False, coco=False, per_image=False)["f1_mean"])


def native_first(net: Any, img: np.ndarray, **kw: Any) -> tuple[Segmentation, bool]:
    """The model's own scale first, then the cells' scale when it is more than 1.3x away."""
    native, d_model = net.cfg.tile_size, inference_defaults(net).cell_diameter
    s = segment(img, net, diameter=None, **kw)
    again, _ = rescale_from_cells(s.labels, native, d_model, native)
    if again == native:
        return s, False
    return segment(img, net, tile_size=again, diameter=None, **kw), True


def main() -> None:
    scale = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    net = load_model("default").eval()
    scores: dict[str, list[float]] = {"auto": [], "native_first": []}
    secs = {"auto": 0.0, "native_first": 0.0}
    sources, second = [], 0
    for it in load_prepared("prepared_hed", "val"):
        img, gt = rescale_pair(*it.load(), scale)
        sources.append(it.source)
        t = time.perf_counter()
        a = segment(img, net, channel_axis=0, normalize=False)
        secs["auto"] += time.perf_counter() - t
        t = time.perf_counter()
        b, two = native_first(net, img, channel_axis=0, normalize=False)
        secs["native_first"] += time.perf_counter() - t
        second += two
        scores["auto"].append(f1(gt, a.labels))
        scores["native_first"].append(f1(gt, b.labels))
    src = np.array(sources)
    for k, v in scores.items():
        arr = np.array(v)
        print(k, f"ALL {arr.mean():.3f}", " ".join(f"{s} {arr[src == s].mean():.3f}" for s in sorted(set(sources))),
              f"s {secs[k]:.1f}")
    print("native_first second passes", second, "of", len(sources))
    if scale != 1.0:
        return
    sc = real_scene("dense512", "../shared/data/dsb2018")
    for k in ("auto", "native_first"):
        run = (lambda: segment(sc.image, net)) if k == "auto" else (lambda: native_first(net, sc.image)[0])
        run()  # warm-up
        t = time.perf_counter()
        s = run()
        dt = time.perf_counter() - t
        print("dense512", k, f"{dt:.2f} s", "cells", s.n_cells, f"F1 {f1(sc.labels, s.labels):.3f}")


if __name__ == "__main__":
    main()
