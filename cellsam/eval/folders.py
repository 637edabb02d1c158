"""Label images in two folders, paired by name and scored (``cellsam evaluate --pred DIR --gt DIR``).

Files are paired by name: the image suffix and one trailing tag (``_labels``, ``_label``, ``_masks``,
``_mask``, ``_cp_masks``, ``_seg``, ``_pred``, ``_gt``) are removed, so ``x_labels.tif`` (``cellsam
segment``), ``x_cp_masks.png`` (Cellpose) and ``x_masks.png`` all pair with ``x_masks.png``. Where a folder
holds tagged files, only those are read (images and overlays beside them are ignored). Errors are
:class:`~cellsam.eval.harness.InputError` naming the folder by its option (``--pred`` / ``--gt``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cellsam.eval.harness import InputError, Prediction, score_predictions

__all__ = ["LABEL_SUFFIXES", "LABEL_TAGS", "evaluate_folders", "label_key", "match_label_files", "read_label_image"]

log = logging.getLogger(__name__)

LABEL_TAGS = ("_cp_masks", "_labels", "_label", "_masks", "_mask", "_seg", "_pred", "_gt")
LABEL_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".png", ".npy")


def label_key(path: Path) -> tuple[str, bool]:
    """(pairing key, has a label tag) of a label file name: suffix and one label tag removed."""
    name = path.name
    for suf in LABEL_SUFFIXES:
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
            break
    for tag in LABEL_TAGS:
        if name.lower().endswith(tag):
            return name[: -len(tag)], True
    return name, False


def _label_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"--{what} {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and any(p.name.lower().endswith(s) for s in LABEL_SUFFIXES))
    keyed = [(label_key(p), p) for p in files]
    if any(tagged for (_, tagged), _ in keyed):
        keyed = [(kt, p) for kt, p in keyed if kt[1]]
    out: dict[str, Path] = {}
    for (key, _), p in keyed:
        if key in out:
            raise InputError(f"--{what} {folder}: {out[key].name} and {p.name} both pair as {key!r}")
        out[key] = p
    if not out:
        raise InputError(f"--{what} {folder}: no label images (.tif/.png/.npy) found")
    return out


def read_label_image(path: Path) -> np.ndarray:
    """(H, W) integer label image from a file; InputError for anything else."""
    from cellsam.io import ImageReadError, read_image

    try:
        arr = np.squeeze(read_image(path))
    except ImageReadError as e:
        raise InputError(str(e)) from None
    if arr.ndim != 2:
        raise InputError(f"{path}: a label image must be 2-D, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.int32)
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0) and arr.min(initial=0) >= 0:
            arr = arr.astype(np.int64)
        else:
            raise InputError(f"{path}: not a label image (dtype {arr.dtype}; expected integers, 0 = background)")
    if arr.size and arr.min() < 0:
        raise InputError(f"{path}: negative labels")
    return arr


def match_label_files(pred_dir: Path, gt_dir: Path, *, missing_as_empty: bool = False
                      ) -> tuple[list[tuple[str, Path, Path | None]], list[str]]:
    """Pair ground-truth and predicted label files by name.

    Returns:
        (name, gt path, pred path or None if missing and ``missing_as_empty``) sorted by name, and the
        names of predictions that have no ground truth.
    Raises:
        InputError: a ground truth without prediction (unless ``missing_as_empty``), or no pair at all.
    """
    gts = _label_files(gt_dir, "gt")
    preds = _label_files(pred_dir, "pred")
    missing = sorted(set(gts) - set(preds))
    extra = sorted(set(preds) - set(gts))
    if missing and not missing_as_empty:
        shown = ", ".join(gts[k].name for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise InputError(f"{len(missing)} ground-truth file(s) have no prediction in {pred_dir}: {shown} "
                         f"(predictions found: {', '.join(sorted(preds)[:5])}...; names pair after removing "
                         f"{'/'.join(LABEL_TAGS)}; --missing-as-empty scores them as empty)")
    if len(missing) == len(gts):
        raise InputError(f"no prediction in {pred_dir} pairs with a ground truth in {gt_dir}")
    return [(k, gts[k], preds.get(k)) for k in sorted(gts)], extra


def evaluate_folders(pred_dir: Path, gt_dir: Path, *, missing_as_empty: bool = False) -> tuple[dict, dict]:
    """Report (harness layout, one method "pred") of label images in two folders, and the label arrays
    ``{name: (gt, pred)}`` for plots."""
    pairs, extra = match_label_files(pred_dir, gt_dir, missing_as_empty=missing_as_empty)
    for name in extra:
        log.warning("prediction %s has no ground truth: ignored", name)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, g, p in pairs:
        gt = read_label_image(g)
        pred = read_label_image(p) if p is not None else np.zeros_like(gt)
        if pred.shape != gt.shape:
            raise InputError(f"{name}: prediction {p} has shape {pred.shape}, ground truth {g} {gt.shape}")
        arrays[name] = (gt, pred)
    gts = [a[0] for a in arrays.values()]
    preds = [Prediction(a[1]) for a in arrays.values()]
    overall = score_predictions(gts, preds, per_image=True)
    rows = overall.pop("per_image")
    for row, name in zip(rows, arrays, strict=True):
        row.update(name=name, source=gt_dir.name, data_type="all", seconds=0.0,
                   pred_file=str(dict((n, p) for n, _, p in pairs)[name]))
    report = {
        "mode": "pred-gt", "pred": str(pred_dir), "gt": str(gt_dir), "unmatched_predictions": extra,
        "images": [{"name": n, "source": gt_dir.name, "data_type": "all"} for n in arrays],
        "methods": {"pred": {"overall": overall, "by_source": {}, "by_data_type": {}, "per_image": rows}},
    }
    return report, arrays
