"""Run segmentation methods over an annotated set and report every metric, overall and per group.

Data (:func:`load_data`):

- a prepared dataset (``cellsam prepare`` output, has ``dataset.json``): the full prepared source images
  of one split, ``<split>/full/*_image.npy`` (3, H, W) float32 in [0, 1] and ``*_labels.npy`` (H, W),
  listed with source, target and kind in ``<split>/images.json`` (``prepare`` writes full images for
  val and test only);
- any folder that ``cellsam prepare`` can read (image/label pairs, DSB, multichannel, npz, COCO): each
  sample is normalised exactly as ``prepare`` does (:func:`cellsam.data.prepare.standardise`).

Methods are callables ``image (3, H, W) float32 in [0, 1] -> Prediction`` (:func:`cellsam_method`,
:mod:`cellsam.eval.baselines`, :mod:`cellsam.eval.prompts`). Every method is scored with
:func:`cellsam.eval.metrics.evaluate_labels` on its label images and with
:func:`cellsam.eval.coco.coco_metrics` on its per-cell masks and scores when it has them (CellSAM: the
masks before the arg-max merge, scored by the CellFinder box score, as in the paper), else on its label
image with every object scored 1.0 (the paper's treatment of Cellpose). Each is reported overall, per
source and per data type (:func:`data_type`).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np

from cellsam.data.normalize import StainGrey
from cellsam.eval.coco import coco_metrics
from cellsam.eval.metrics import evaluate_labels
from cellsam.models.protocol import SegmentationModel
from cellsam.ops.masks import CellMask

log = logging.getLogger(__name__)

__all__ = [
    "DATA_TYPES", "EvalItem", "Prediction", "data_type", "load_prepared", "load_folder", "load_data",
    "cellsam_method", "predict_all", "score_predictions", "evaluate_methods", "format_tables", "write_json",
    "as_json", "InputError", "TruthMethod",
]

DATA_TYPES = ("nuclear", "cell culture", "bacteria", "yeast", "tissue", "H&E")


class TruthMethod(Protocol):
    """A method that also reads the ground truth (the prompt study): ``method(image, gt)``, marked by
    ``uses_truth = True``."""

    uses_truth: bool

    def __call__(self, image: np.ndarray, gt: np.ndarray, /) -> Prediction: ...


Method = Callable[[np.ndarray], "Prediction"] | TruthMethod


class InputError(ValueError):
    """Bad evaluation input: missing / unmatched / unreadable label files, unknown methods."""


def data_type(kind: str, target: str) -> str:
    """The paper's data type (Fig. 2c) of an image from its ``kind`` and ``target``.

    ``kind`` is free text from the data's manifest ("H&E", "cell culture / phase+nuclear", "bacteria /
    phase", "nuclear / nuclear", "mixed", ...). A kind naming one of :data:`DATA_TYPES` (its first word
    before " / ", or "H&E" / "tissue" anywhere) gives that type; otherwise nuclear targets are "nuclear"
    and anything else keeps its kind's first part (or "unknown").
    """
    k = (kind or "").strip()
    low = k.lower()
    if "h&e" in low or "he stain" in low:
        return "H&E"
    head = low.split("/")[0].strip()
    for t in DATA_TYPES:
        if head.startswith(t.lower()):
            return t
    if "tissue" in low:
        return "tissue"
    if target == "nuclear":
        return "nuclear"
    return head or "unknown"


@dataclass
class EvalItem:
    """One annotated image. ``load()`` returns (image (3, H, W) float32 in [0, 1], labels (H, W) int32)."""

    name: str
    source: str
    target: str
    kind: str
    loader: Callable[[], tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @property
    def data_type(self) -> str:
        return data_type(self.kind, self.target)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        image, labels = self.loader()
        return np.asarray(image, np.float32), np.asarray(labels).astype(np.int32, copy=False)


@dataclass
class Prediction:
    """A method's answer for one image.

    Attributes:
        labels: (H, W) int32 label image, 0 = background.
        masks: optional per-cell masks (may overlap, e.g. before CellSAM's arg-max merge) used for COCO AP.
        scores: (len(masks),) confidence of each mask; None = 1.0 each.
        seconds: wall time of the prediction.
    """

    labels: np.ndarray
    masks: list[CellMask] | None = None
    scores: np.ndarray | None = None
    seconds: float = 0.0


def _npy_loader(image_path: Path, labels_path: Path) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    return lambda: (np.load(image_path), np.load(labels_path))


def load_prepared(root: str | Path, split: str = "val", *, limit: int | None = None) -> list[EvalItem]:
    """The full images of one split of a prepared dataset (see the module docstring).

    Raises:
        FileNotFoundError: no ``dataset.json`` / ``<split>/images.json``.
        ValueError: the split has no full images or is empty.
    """
    root = Path(root)
    if not (root / "dataset.json").is_file():
        raise FileNotFoundError(f"{root} is not a prepared dataset (no dataset.json); run 'cellsam prepare'")
    index = root / split / "images.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: split {split!r} does not exist in {root}")
    entries = json.loads(index.read_text())
    if not entries:
        raise ValueError(f"split {split!r} of {root} has no images")
    missing = [e["image"] for e in entries if "image_npy" not in e]
    if missing:
        raise ValueError(
            f"split {split!r} of {root} has no full images ({len(missing)} entries without 'image_npy'); "
            "'cellsam prepare' writes them for val and test only"
        )
    items = [
        EvalItem(name=e["image"], source=e["source"], target=e.get("target", "unknown"),
                 kind=e.get("kind", "unknown"), loader=_npy_loader(root / e["image_npy"], root / e["labels_npy"]))
        for e in entries
    ]
    return items[:limit] if limit is not None else items


def load_folder(path: str | Path, *, limit: int | None = None, stain: StainGrey = "luminance") -> list[EvalItem]:
    """Annotated images of a raw source folder, normalised as ``cellsam prepare`` does (no tiling; stained
    colour pictures made grey by ``stain``).

    Raises:
        ValueError: nothing readable was found (the reader's messages are included).
    """
    from cellsam.data.prepare import standardise
    from cellsam.data.readers import read_source
    from cellsam.data.sample import Sample

    path = Path(path)
    items: list[EvalItem] = []
    errors: list[str] = []
    for s in read_source(path, stain=stain):
        if not isinstance(s, Sample):
            errors.append(str(s))
            continue
        _, image, labels = standardise(s)
        items.append(EvalItem(name=s.path, source=s.source, target=s.target, kind=s.kind,
                              loader=_loaded(image, labels)))
        if limit is not None and len(items) >= limit:
            break
    for e in errors:
        log.warning("skipped: %s", e)
    if not items:
        raise ValueError(f"no annotated images found in {path}" + (f": {'; '.join(errors[:5])}" if errors else ""))
    return items


def _loaded(image: np.ndarray, labels: np.ndarray) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """An :class:`EvalItem` loader of an image already in memory."""
    return lambda: (image, labels)


def load_data(path: str | Path, split: str = "val", *, limit: int | None = None,
              stain: StainGrey | None = None) -> list[EvalItem]:
    """:func:`load_prepared` if ``path`` holds a ``dataset.json``, else :func:`load_folder`.

    ``stain``: the colour rule of the model to be evaluated (:func:`cellsam.inference.preprocess.stain_grey`);
    a folder's colour pictures are made grey by it, and a prepared dataset made by another rule is refused
    (``ValueError``). None: no model (a folder is read by the luminance rule)."""
    from cellsam.data.prepare import dataset_stain_grey

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / "dataset.json").is_file():
        if stain is not None and (made := dataset_stain_grey(path)) != stain:
            raise ValueError(f"{path} was prepared with stained colour pictures as {made}, but the model takes them "
                             f"as {stain}: prepare the data again with 'cellsam prepare --stain-grey {stain}'")
        return load_prepared(path, split, limit=limit)
    return load_folder(path, limit=limit, stain=stain or "luminance")


def cellsam_method(model: SegmentationModel | str, **segment_kwargs: Any) -> Method:
    """A method running :func:`cellsam.inference.segment.segment` on prepared images (no re-normalisation,
    ``channel_axis=0``, per-cell masks and box scores kept for COCO)."""
    from cellsam.inference.segment import Segmentation, segment

    def run(image: np.ndarray) -> Prediction:
        t0 = time.perf_counter()
        seg = segment(image, model, channel_axis=0, normalize=False, return_masks=True, **segment_kwargs)
        assert isinstance(seg, Segmentation)  # one image in, one result out
        return Prediction(seg.labels, seg.masks, seg.scores, time.perf_counter() - t0)

    return run


def predict_all(items: Sequence[EvalItem], method: Method, *, name: str = "method",
                progress: bool = False) -> Iterator[tuple[EvalItem, np.ndarray, Prediction]]:
    """Yield (item, ground-truth labels, prediction) for each item (images are loaded one at a time).

    A method with the attribute ``uses_truth = True`` is called as ``method(image, gt)`` (prompt study).
    """
    it: Any = items
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(items, desc=name, unit="img")
    for item in it:
        image, gt = item.load()
        if getattr(method, "uses_truth", False):
            pred = cast(TruthMethod, method)(image, gt)
        else:
            pred = cast(Callable[[np.ndarray], Prediction], method)(image)
        if not isinstance(pred, Prediction):
            pred = Prediction(np.asarray(pred))
        if pred.labels.shape != gt.shape:
            raise ValueError(f"{name}: prediction for {item.name} has shape {pred.labels.shape}, "
                             f"ground truth {gt.shape}")
        yield item, gt, pred


class _MaskStacks(Sequence):
    """Per-image (N, H, W) bool mask stacks built on access from crops, so only one image's stack is in
    memory while COCO encodes it."""

    def __init__(self, shapes: list[tuple[int, int]], masks: list[list[CellMask]]) -> None:
        self.shapes, self.masks = shapes, masks

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        out = np.zeros((len(self.masks[i]), *self.shapes[i]), bool)
        for k, m in enumerate(self.masks[i]):
            h, w = m.mask.shape
            out[k, m.y0 : m.y0 + h, m.x0 : m.x0 + w] = m.mask
        return out


def _coco(gts: list[np.ndarray], preds: list[Prediction]) -> dict:
    if all(p.masks is not None for p in preds):
        masks = _MaskStacks([g.shape for g in gts], [list(p.masks or []) for p in preds])
        scores = [None if p.scores is None else np.asarray(p.scores, np.float64) for p in preds]
        out = coco_metrics(gts, masks, scores)
        out["detections"] = "per-cell masks before merging, with the method's scores"
    else:
        out = coco_metrics(gts, [p.labels for p in preds])
        out["detections"] = "label image objects, score 1.0 each"
    return out


def score_predictions(gts: list[np.ndarray], preds: list[Prediction], *, per_image: bool = False) -> dict:
    """:func:`evaluate_labels` (every threshold, DeepCell breakdown) plus COCO (see :func:`_coco`)."""
    out = evaluate_labels(gts, [p.labels for p in preds], coco=False, per_image=per_image)
    out["coco"] = _coco(gts, preds)
    out["seconds"] = float(sum(p.seconds for p in preds))
    return out


def _groups(items: Sequence[EvalItem], key: Callable[[EvalItem], str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        out.setdefault(key(it), []).append(i)
    return dict(sorted(out.items()))


def evaluate_methods(items: Sequence[EvalItem], methods: Mapping[str, Method], *, progress: bool = False,
                     keep: Callable[[str, EvalItem, np.ndarray, Prediction], None] | None = None) -> dict:
    """Run each method over the items and score it overall, per source and per data type.

    Args:
        items: the annotated images.
        methods: display name -> method.
        keep: optional callback ``(method, item, gt, prediction)`` for each image (e.g. to keep the
            worst images for plots); predictions are otherwise dropped after scoring.

    Returns:
        JSON-serialisable ``{"images": [...], "methods": {name: {"overall", "by_source", "by_data_type",
        "per_image"}}}``. ``per_image`` rows carry the item's name, source and data type.
    """
    if not items:
        raise ValueError("no images to evaluate")
    if not methods:
        raise ValueError("no methods to evaluate")
    report: dict[str, Any] = {
        "images": [{"name": it.name, "source": it.source, "data_type": it.data_type, "target": it.target,
                    "kind": it.kind} for it in items],
        "methods": {},
    }
    by_source = _groups(items, lambda it: it.source)
    by_type = _groups(items, lambda it: it.data_type)
    for name, method in methods.items():
        gts: list[np.ndarray] = []
        preds: list[Prediction] = []
        for item, gt, pred in predict_all(items, method, name=name, progress=progress):
            gts.append(gt)
            preds.append(pred)
            if keep is not None:
                keep(name, item, gt, pred)
        overall = score_predictions(gts, preds, per_image=True)
        rows = overall.pop("per_image")
        for row, it, p in zip(rows, items, preds, strict=True):
            row.update(name=it.name, source=it.source, data_type=it.data_type, seconds=p.seconds)

        def sub(idx: list[int], gts=gts, preds=preds) -> dict:
            return score_predictions([gts[i] for i in idx], [preds[i] for i in idx])

        report["methods"][name] = {
            "overall": overall,
            "by_source": {k: sub(v) for k, v in by_source.items()},
            "by_data_type": {k: sub(v) for k, v in by_type.items()},
            "per_image": rows,
        }
    return report


# ------------------------------------------------------------------------------------------ reporting
_COLUMNS = (
    ("images", lambda r: f"{r['n_images']}"),
    ("cells", lambda r: f"{r['n_true']}"),
    ("pred", lambda r: f"{r['n_pred']}"),
    ("F1>.6 DC", lambda r: _f(r.get("deepcell", {}).get("f1"))),
    ("P>.6", lambda r: _f(r.get("deepcell", {}).get("precision"))),
    ("R>.6", lambda r: _f(r.get("deepcell", {}).get("recall"))),
    ("F1@.5 mean", lambda r: _f(r["f1_mean"])),
    ("AP50 CP", lambda r: _f(r["ap50"])),
    ("AP75 CP", lambda r: _f(r["ap75"])),
    ("mSA", lambda r: _f(r["msa"])),
    ("AJI", lambda r: _f(r["aji"])),
    ("COCO AP", lambda r: _f(r["coco"]["ap"])),
    ("COCO AP50", lambda r: _f(r["coco"]["ap50"])),
    ("s/img", lambda r: _f(r["seconds"] / max(r["n_images"], 1), 2)),
)

LEGEND = (
    "F1>.6 DC / P / R: DeepCell object metrics, pooled over images, match at IoU > 0.6 (the paper's F1). "
    "F1@.5 mean: per-image F1 at IoU >= 0.5 averaged over images (CellSAM reference code). "
    "AP50/AP75 CP: Cellpose AP = TP/(TP+FP+FN) at IoU >= t, image mean. mSA: that AP averaged over "
    "IoU 0.50:0.95. AJI: aggregated Jaccard index (Cellpose). COCO AP / AP50: mask AP, maxDets 10000."
)


def _f(v: float | None, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _table(title: str, rows: dict[str, dict]) -> str:
    head = ["group"] + [c for c, _ in _COLUMNS]
    body = [[k] + [fn(r) for _, fn in _COLUMNS] for k, r in rows.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([title, line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def format_tables(report: dict) -> str:
    """Plain-text tables: per method, overall + per source + per data type; then a legend."""
    parts = []
    for name, res in report["methods"].items():
        parts.append(_table(f"== {name}: by source", {"ALL": res["overall"], **res["by_source"]}))
        if res["by_data_type"]:
            parts.append(_table(f"== {name}: by data type", res["by_data_type"]))
    if len(report["methods"]) > 1:
        parts.append(_table("== all methods, overall", {n: r["overall"] for n, r in report["methods"].items()}))
    parts.append(LEGEND)
    return "\n\n".join(parts)


def environment() -> dict[str, str]:
    """Versions of Python and the libraries the numbers depend on."""
    import torch

    import cellsam

    env = {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
           "cellsam": cellsam.__version__, "machine": platform.platform()}
    try:
        from importlib.metadata import version

        env["faster_coco_eval"] = version("faster-coco-eval")
    except Exception:  # noqa: BLE001 - metadata is optional information
        pass
    return env


def _no_nan(x: Any) -> Any:
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def as_json(report: dict) -> dict:
    """The report exactly as :func:`write_json` stores it (non-finite numbers None, tuples lists, keys str)."""
    return json.loads(json.dumps(_no_nan(report), allow_nan=False))


def write_json(path: str | Path, report: dict) -> Path:
    """Write the report (every number) as indented JSON (a non-finite number, if any, becomes null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_no_nan(report), indent=1, allow_nan=False))
    return path
