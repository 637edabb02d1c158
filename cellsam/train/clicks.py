"""Click prompts as people give them, for training and evaluating the mask decoder (SAM's simulation).

A first click falls inside the cell; each later click is drawn uniformly from the error region of the
previous prediction: a pixel of the cell that was missed gives a positive click, a pixel wrongly
included a negative one (SAM's and micro-sam's iterative prompting).

Clicks are (x, y) pixel indices, SAM's convention: the prompt encoder adds 0.5 to reach the pixel's
centre.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = ["correction_clicks", "innermost_points", "random_points"]


def _uniform_pixel(region: Tensor, generator: torch.Generator) -> Tensor:
    """(N,H,W) bool -> (N,2) xy pixel indices, one uniform pixel of each non-empty region (else -1)."""
    n = region.shape[0]
    flat = region.flatten(1).float()
    out = torch.full((n, 2), -1.0)
    has = flat.sum(1) > 0
    if bool(has.any()):
        idx = torch.multinomial(flat[has].cpu(), 1, generator=generator)[:, 0]
        w = region.shape[-1]
        out[has] = torch.stack([(idx % w).float(), (idx // w).float()], dim=1)
    return out.to(region.device)


def random_points(masks: Tensor, generator: torch.Generator) -> Tensor:
    """One positive click per mask, uniform over its pixels.

    Args:
        masks: (N,H,W) bool, each non-empty.
    Returns:
        (N,2) float xy pixel indices of the masks.
    """
    if masks.ndim != 3:
        raise ValueError(f"expected masks (N,H,W), got {tuple(masks.shape)}")
    if masks.shape[0] and not bool(masks.flatten(1).any(1).all()):
        raise ValueError("every mask needs at least one pixel")
    return _uniform_pixel(masks.bool(), generator)


def correction_clicks(pred: Tensor, target: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The next click for each prediction: uniform over its error region.

    Args:
        pred, target: (N,H,W) bool predicted and true masks.
    Returns:
        xy (N,2) float pixel indices and labels (N,) long: 1 where the click is a missed cell pixel,
        0 where it is a false one. A prediction without errors gets a positive click inside its cell.
    """
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must both be (N,H,W), got {tuple(pred.shape)}, {tuple(target.shape)}")
    pred, target = pred.bool(), target.bool()
    error = pred ^ target
    perfect = ~error.flatten(1).any(1)
    region = torch.where(perfect[:, None, None], target, error)
    xy = _uniform_pixel(region, generator)
    col, row = xy[:, 0].long(), xy[:, 1].long()
    labels = target[torch.arange(target.shape[0], device=target.device), row, col].long()
    return xy, labels


def innermost_points(labels: np.ndarray, ids: np.ndarray | None = None) -> dict[int, tuple[float, float]]:
    """Each cell's innermost pixel (the maximum of its distance to the background and other cells).

    Args:
        labels: (H,W) integer instance labels, 0 = background; ids: the cells (default: all).
    Returns:
        {id: (x, y)} pixel indices (the first maximum in row-major order).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"expected a (H,W) label image, got shape {lab.shape}")
    want = {int(v) for v in (np.unique(lab[lab > 0]) if ids is None else np.asarray(ids).ravel())}
    out: dict[int, tuple[float, float]] = {}
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None or i not in want:
            continue
        crop = np.pad(lab[sl] == i, 1)
        dist = ndimage.distance_transform_edt(crop)
        r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
        out[i] = (float(sl[1].start + c - 1), float(sl[0].start + r - 1))
    return out
