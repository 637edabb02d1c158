"""SYNTHETIC cell images with exact labels, for tests and for augmenting training.

Everything here is generated, not measured: use it for the archetypes the real data lacks
(yeast, rod-shaped bacteria, dense tissue with nuclear + membrane channels, phase-contrast
halos) and say so wherever a result depends on it. Every generator is deterministic in
``seed`` and returns raw intensities in [0, 1] plus an int32 label image (0 background,
1..n objects, no overlaps; objects may touch).

- :func:`yeast`: round / oval cells, some with a bud (one object per mother + bud).
- :func:`rod_bacteria`: capsule-shaped rods at random angles, optionally phase contrast.
- :func:`dense_tissue`: packed cells (Voronoi) with a nuclear and a membrane channel, and both
  whole-cell and nuclear labels.
- :func:`phase_contrast`: dark objects with bright halos on a grey background, from labels.
- :func:`write_pairs`: a ``*_img.tif`` / ``*_masks.tif`` folder that ``cellsam prepare`` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


def _finish(signal: np.ndarray, rng: np.random.Generator, *, noise: float, blur: float = 1.0) -> np.ndarray:
    img = ndi.gaussian_filter(signal.astype(np.float64), blur) + rng.normal(0, noise, signal.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def _place(labels: np.ndarray, shape_mask: np.ndarray, y0: int, x0: int, k: int, margin: int = 1) -> bool:
    """Put a (h, w) bool object at (y0, x0) if it and a ``margin`` ring around it are free."""
    h, w = shape_mask.shape
    H, W = labels.shape
    if y0 < 0 or x0 < 0 or y0 + h > H or x0 + w > W:
        return False
    grown = ndi.binary_dilation(shape_mask, iterations=margin) if margin else shape_mask
    if labels[y0 : y0 + h, x0 : x0 + w][grown].any():
        return False
    labels[y0 : y0 + h, x0 : x0 + w][shape_mask] = k
    return True


def _origin(rng: np.random.Generator, shape: tuple[int, int], obj: tuple[int, ...]) -> tuple[int, int]:
    return int(rng.integers(0, max(shape[0] - obj[0], 0) + 1)), int(
        rng.integers(0, max(shape[1] - obj[1], 0) + 1)
    )


def _ellipse(ry: float, rx: float, angle: float) -> np.ndarray:
    r = int(np.ceil(max(ry, rx))) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def yeast(
    shape: tuple[int, int] = (256, 256),
    n: int = 30,
    *,
    seed: int = 0,
    bud_fraction: float = 0.4,
    radius: tuple[float, float] = (7.0, 12.0),
    noise: float = 0.03,
) -> tuple[np.ndarray, np.ndarray]:
    """Budding yeast (synthetic): bright-rimmed round cells, some with a smaller attached bud.

    Returns:
        image (H, W) float32 in [0, 1]; labels (H, W) int32 (mother + bud = one object).
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    k = 0
    for _ in range(n * 30):
        if k == n:
            break
        r = rng.uniform(*radius)
        cell = _ellipse(r, r * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi))
        if rng.random() < bud_fraction:  # add a bud on the rim
            rb, a = r * rng.uniform(0.4, 0.6), rng.uniform(0, 2 * np.pi)
            pad = int(np.ceil(2 * rb)) + 1
            cell = np.pad(cell, pad)
            c = cell.shape[0] // 2
            bud = _ellipse(rb, rb, 0.0)
            by, bx = int(round(c + (r + rb * 0.6) * np.sin(a))), int(round(c + (r + rb * 0.6) * np.cos(a)))
            hb = bud.shape[0] // 2
            cell[by - hb : by + hb + 1, bx - hb : bx + hb + 1] |= bud
        if _place(labels, cell, *_origin(rng, shape, cell.shape), k + 1):
            k += 1
    inside = labels > 0
    rim = inside & ~ndi.binary_erosion(inside, iterations=2)
    signal = 0.35 * inside + 0.45 * rim + 0.1
    return _finish(signal, rng, noise=noise), labels


def _capsule(length: float, width: float, angle: float) -> np.ndarray:
    r = int(np.ceil(length / 2 + width)) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    half = max(length / 2 - width / 2, 0.0)
    du = np.maximum(np.abs(u) - half, 0.0)
    return du**2 + v**2 <= (width / 2) ** 2


def rod_bacteria(
    shape: tuple[int, int] = (256, 256),
    n: int = 40,
    *,
    seed: int = 0,
    length: tuple[float, float] = (12.0, 28.0),
    width: tuple[float, float] = (5.0, 7.0),
    phase: bool = True,
    noise: float = 0.03,
) -> tuple[np.ndarray, np.ndarray]:
    """Rod-shaped bacteria (synthetic): capsules at random angles, phase-contrast look by default.

    Returns:
        image (H, W) float32 in [0, 1]; labels (H, W) int32.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    k = 0
    for _ in range(n * 30):
        if k == n:
            break
        rod = _capsule(rng.uniform(*length), rng.uniform(*width), rng.uniform(0, np.pi))
        if _place(labels, rod, *_origin(rng, shape, rod.shape), k + 1):
            k += 1
    if phase:
        return phase_contrast(labels, seed=seed, noise=noise), labels
    return _finish(0.7 * (labels > 0) + 0.05, rng, noise=noise), labels


def phase_contrast(labels: np.ndarray, *, seed: int = 0, halo: int = 3, noise: float = 0.03) -> np.ndarray:
    """Phase-contrast look (synthetic) for a label image: dark objects, bright halos, grey background.

    Returns:
        (H, W) float32 in [0, 1].
    """
    rng = np.random.default_rng(seed)
    inside = labels > 0
    ring = ndi.binary_dilation(inside, iterations=halo) & ~inside
    dist = ndi.distance_transform_edt(~inside)
    halo_sig = np.where(ring, np.exp(-dist / max(halo / 2, 1)), 0.0)
    signal = 0.5 - 0.3 * inside + 0.35 * halo_sig
    return _finish(signal, rng, noise=noise, blur=0.8)


def dense_tissue(
    shape: tuple[int, int] = (256, 256), n: int = 80, *, seed: int = 0, noise: float = 0.03
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dense tissue (synthetic): packed Voronoi cells with a nucleus each.

    Returns:
        nuclear (H, W) float32, membrane (H, W) float32 (both in [0, 1]),
        wholecell_labels (H, W) int32, nuclear_labels (H, W) int32 (nucleus k lies in cell k).
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    pts = rng.uniform([0, 0], [h, w], size=(n, 2))
    yy, xx = np.mgrid[:h, :w]
    d = (yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2
    owner = d.argmin(-1)
    cells = owner.astype(np.int32) + 1
    # one-pixel gaps between cells: membrane pixels are background in the whole-cell labels
    edge = np.zeros(shape, bool)
    edge[:-1] |= cells[:-1] != cells[1:]
    edge[:, :-1] |= cells[:, :-1] != cells[:, 1:]
    cells[edge] = 0
    nuclei = np.zeros(shape, np.int32)
    for k in range(1, n + 1):
        m = cells == k
        if m.sum() < 20:
            cells[m] = 0
            continue
        core = ndi.binary_erosion(m, iterations=3)
        if not core.any():
            core = m
        dk = ndi.distance_transform_edt(core)
        cy, cx = np.unravel_index(int(dk.argmax()), shape)
        r = max(2.0, min(float(dk.max()), np.sqrt(m.sum() / np.pi) * 0.5))
        nuc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & core
        nuclei[nuc] = k
    from cellsam.data.labels import filter_labels

    # keep cell k and nucleus k paired: renumber both by the cells that survive the filters
    cells_f, _ = filter_labels(cells)
    mapping = np.zeros(n + 1, np.int32)
    for k in range(1, n + 1):
        vals = cells_f[cells == k]
        mapping[k] = vals.max() if vals.size else 0
    nuclei = mapping[nuclei]
    membrane_sig = ndi.binary_dilation(edge, iterations=1).astype(np.float64) * 0.8 + 0.05
    nuclear_sig = 0.75 * (nuclei > 0) + 0.05
    return (
        _finish(nuclear_sig, rng, noise=noise),
        _finish(membrane_sig, rng, noise=noise),
        cells_f,
        nuclei.astype(np.int32),
    )


def write_pairs(folder: str | Path, *, n: int = 4, size: int = 256, seed: int = 0) -> list[Path]:
    """Write a small SYNTHETIC pairs-layout data set (``<kind>_<i>_img.tif`` + ``_masks.tif``).

    Kinds cycle through yeast, phase-contrast rods, and dense tissue (membrane channel).
    Returns the image paths.
    """
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        kind = ("yeast", "rods", "tissue")[i % 3]
        if kind == "yeast":
            img, lab = yeast((size, size), seed=seed + i)
        elif kind == "rods":
            img, lab = rod_bacteria((size, size), seed=seed + i)
        else:
            _, img, lab, _ = dense_tissue((size, size), n=max(8, size * size // 800), seed=seed + i)
        p = folder / f"{kind}_{i:03d}_img.tif"
        tifffile.imwrite(p, (img * 65535).astype(np.uint16))
        tifffile.imwrite(folder / f"{kind}_{i:03d}_masks.tif", lab.astype(np.uint16))
        out.append(p)
    return out
