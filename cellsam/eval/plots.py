"""PNG figures of an evaluation report (matplotlib, Agg backend, imported lazily).

- :func:`plot_f1_by_data_type`: bars of F1 per data type, one bar per method, as in the paper's Fig. 2c.
  Bar = mean over images of the per-image DeepCell F1 (IoU > 0.6); error bar = standard error of that
  mean (none for a single image); the number of images is written under each group.
- :func:`plot_examples`: the worst images of a method (lowest DeepCell F1), each shown as the image with
  ground-truth outlines (green) and predicted outlines (magenta), with its F1 in the title.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellsam.io import display_image
from cellsam.ops.masks import outlines

__all__ = ["Example", "plot_f1_by_data_type", "plot_examples", "worst_images"]

GT_COLOR = (0.1, 0.9, 0.2)
PRED_COLOR = (1.0, 0.2, 1.0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _image_f1(row: dict) -> float:
    return float(row["deepcell"]["f1"]) if "deepcell" in row else float(row["f1"]["0.50"])


def f1_stats_by_data_type(report: dict) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{method: {data type: (mean F1, s.e.m., n images)}}`` from the per-image rows of a report."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for name, res in report["methods"].items():
        groups: dict[str, list[float]] = {}
        for row in res["per_image"]:
            groups.setdefault(row.get("data_type", "all"), []).append(_image_f1(row))
        out[name] = {}
        for k, v in sorted(groups.items()):
            a = np.asarray(v, np.float64)
            sem = float(a.std(ddof=1) / np.sqrt(a.size)) if a.size > 1 else 0.0
            out[name][k] = (float(a.mean()), sem, int(a.size))
    return out


def plot_f1_by_data_type(report: dict, path: str | Path, *, title: str = "F1 by data type") -> Path:
    """Grouped bar chart (data types x methods) of image-mean DeepCell F1 with s.e.m. error bars."""
    plt = _pyplot()
    stats = f1_stats_by_data_type(report)
    methods = list(stats)
    types = sorted({t for m in stats.values() for t in m})
    if not types:
        raise ValueError("the report has no per-image rows to plot")
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(types) * max(1, len(methods)) ** 0.5 + 1.5), 3.6))
    x = np.arange(len(types))
    for k, m in enumerate(methods):
        mean = [stats[m].get(t, (np.nan, 0.0, 0))[0] for t in types]
        sem = [stats[m].get(t, (np.nan, 0.0, 0))[1] for t in types]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, mean, width, yerr=sem, capsize=3, label=m)
    n_img = [max(stats[m].get(t, (0, 0, 0))[2] for m in methods) for t in types]
    ax.set_xticks(x, [f"{t}\n(n={n})" for t, n in zip(types, n_img, strict=True)])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1 (DeepCell, IoU > 0.6)")
    ax.set_title(f"{title}\nbars: mean over images; error bars: s.e.m.", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class Example:
    """One image to show: prepared image (3, H, W), ground truth and predicted labels (H, W)."""

    title: str
    image: np.ndarray
    gt: np.ndarray
    pred: np.ndarray
    f1: float


def worst_images(report: dict, method: str, k: int = 6) -> list[int]:
    """Indices (into the report's images) of the ``k`` images with the lowest DeepCell F1 of ``method``."""
    rows = report["methods"][method]["per_image"]
    order = sorted(range(len(rows)), key=lambda i: (_image_f1(rows[i]), -rows[i]["n_true"]))
    return order[:k]


def _overlay(ex: Example) -> np.ndarray:
    rgb = display_image(ex.image).astype(np.float64) / 255.0
    rgb[outlines(ex.gt)] = GT_COLOR
    rgb[outlines(ex.pred)] = PRED_COLOR
    return rgb


def plot_examples(examples: Sequence[Example], path: str | Path, *, columns: int = 3,
                  title: str = "worst images") -> Path:
    """A grid of images with ground-truth (green) and predicted (magenta) outlines."""
    if not examples:
        raise ValueError("no examples to plot")
    plt = _pyplot()
    cols = min(columns, len(examples))
    rows = -(-len(examples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, ex in zip(axes.ravel(), examples, strict=False):
        ax.imshow(_overlay(ex), interpolation="nearest")
        n_true, n_pred = np.unique(ex.gt[ex.gt > 0]).size, np.unique(ex.pred[ex.pred > 0]).size
        name = Path(ex.title).name
        name = name if len(name) <= 36 else name[:16] + "..." + name[-17:]
        ax.set_title(f"{name}\nF1 {ex.f1:.2f}, true {n_true}, predicted {n_pred}", fontsize=8)
    fig.suptitle(f"{title}  (green: ground truth, magenta: prediction)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
