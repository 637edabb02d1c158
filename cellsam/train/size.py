"""The "size" training stage: fit the size model (:class:`~cellsam.models.size_head.SizeHead`) in closed form.

Cellpose's SizeModel, on our encoder: random training crops are shown to the trained, frozen encoder at
scales drawn log-uniformly from ``size_scale_range``; each gives the encoder's size features and the log of
the median diameter of the cells it holds (each cell's area measured on the whole prepared tile, so cells
cut by the crop count at their full size, times the scale). A ridge regression from the standardised size
features to the log diameters is the size model. The stage also stores ``inference.cell_diameter``: the
median diameter of the training cells at scale 1, the scale that ``segment(diameter=...)`` brings images to.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cellsam.models.cellsam import CellSAM
from cellsam.models.conv_encoder import ConvEncoder, set_fast_inference
from cellsam.train.config import TrainConfig
from cellsam.train.dataset import PreparedTiles, adopt_data_stain

log = logging.getLogger(__name__)

__all__ = ["SizeFit", "fit_ridge", "fit_size_model", "size_samples"]

MIN_CELLS = 3  # a crop with fewer cells says little about the image's cell size


@dataclass(frozen=True)
class SizeFit:
    """A fitted regression and how well it fits."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: float
    rmse_log: float  # root mean square error of the log diameter on the fitting samples
    samples: int

    def predict(self, x: Tensor) -> Tensor:
        """(N, F) features -> (N,) predicted log diameters (what the fitted SizeHead computes)."""
        return ((x.float() - self.mean) / self.std) @ self.weight + self.bias


def fit_ridge(x: Tensor, y: Tensor, *, ridge: float = 1.0) -> SizeFit:
    """Ridge regression of y on standardised x: (N, F), (N,) -> :class:`SizeFit`."""
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
        raise ValueError(f"need x (N, F) and y (N,) with N >= 2, got {tuple(x.shape)}, {tuple(y.shape)}")
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    bias = y.mean()
    a = z.T @ z + ridge * torch.eye(z.shape[1], dtype=z.dtype)
    weight = torch.linalg.solve(a, z.T @ (y - bias))
    rmse = float(((z @ weight + bias - y) ** 2).mean().sqrt())
    return SizeFit(mean.float(), std.float(), weight.float(), float(bias), rmse, int(x.shape[0]))


def _crop(image: np.ndarray, labels: np.ndarray, scale: float, side: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """A region of ``side / scale`` pixels of a (3, H, W) tile (zero-padded beyond it) and its labels."""
    region = max(8, int(round(side / scale)))
    _, h, w = image.shape
    y0 = int(rng.integers(0, max(h - region, 0) + 1))
    x0 = int(rng.integers(0, max(w - region, 0) + 1))
    img = np.zeros((3, region, region), np.float32)
    lab = np.zeros((region, region), labels.dtype)
    ph, pw = min(region, h - y0), min(region, w - x0)
    img[:, :ph, :pw] = image[:, y0 : y0 + ph, x0 : x0 + pw]
    lab[:ph, :pw] = labels[y0 : y0 + ph, x0 : x0 + pw]
    return img, lab


def size_samples(model: CellSAM, tiles: PreparedTiles, *, n: int, scale_range: tuple[float, float],
                 balance_power: float, seed: int, batch_size: int = 16) -> tuple[Tensor, Tensor, float]:
    """Style vectors (n, F), log median diameters (n,) and the median training diameter at scale 1."""
    if not isinstance(model.image_encoder, ConvEncoder):
        raise ValueError("the size model reads the conv encoder's size features")
    rng = np.random.default_rng(seed)
    weights = np.asarray(tiles.source_weights(balance_power), np.float64)
    weights /= weights.sum()
    side = model.img_size
    lo, hi = math.log(scale_range[0]), math.log(scale_range[1])
    feats: list[torch.Tensor] = []
    targets: list[float] = []
    native: list[float] = []
    batch: list[np.ndarray] = []
    model.eval()
    with torch.inference_mode():
        while len(targets) < n:
            i = tiles.index[int(rng.choice(len(weights), p=weights))]
            labels = np.asarray(tiles.labels[i, 0])
            areas = np.bincount(labels.ravel().astype(np.int64))
            scale = math.exp(rng.uniform(lo, hi))
            img, lab = _crop(np.asarray(tiles.images[i]), labels, scale, side, rng)
            ids = np.unique(lab)
            ids = ids[ids > 0]
            if ids.size < MIN_CELLS:
                continue
            diam = float(np.median(2.0 * np.sqrt(areas[ids] / np.pi)))
            native.append(diam)
            targets.append(math.log(diam * scale))
            batch.append(img)
            if len(batch) == batch_size or len(targets) == n:
                x = torch.from_numpy(np.stack([_resize(b, side) for b in batch]))
                feats.append(model.image_encoder.size_features(model.preprocess(x)).float())
                batch = []
    return torch.cat(feats), torch.tensor(targets), float(np.median(native))


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    t = torch.from_numpy(image)[None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0].numpy()


def fit_size_model(cfg: TrainConfig) -> Path:
    """Run a "size" stage: load ``cfg.init``, fit its size model on ``cfg.data``'s training tiles, export.

    Writes ``model.safetensors`` (+ .json) and ``summary.json`` (fit error, held-out error) to
    ``cfg.output``; returns the model's path.
    """
    from cellsam.weights import load_model, save_model

    if not cfg.init:
        raise ValueError("a size stage starts from a trained model: give init (or an earlier stage)")
    model = set_fast_inference(adopt_data_stain(load_model(cfg.init), cfg.data), False)  # as training (run.py)
    if model.size_head is None:
        model = _with_size_head(model)
    tiles = PreparedTiles(cfg.data, "train", sources=cfg.sources, exclude_sources=cfg.exclude_sources)
    x, y, native = size_samples(model, tiles, n=cfg.size_samples, scale_range=cfg.size_scale_range,
                                balance_power=cfg.source_balance, seed=cfg.seed)
    n_fit = int(0.9 * len(y))
    check = fit_ridge(x[:n_fit], y[:n_fit], ridge=cfg.size_ridge)
    held_out = float(((check.predict(x[n_fit:]) - y[n_fit:]) ** 2).mean().sqrt())
    fit = fit_ridge(x, y, ridge=cfg.size_ridge)
    assert model.size_head is not None
    model.size_head.set_fit(fit.mean, fit.std, fit.weight, fit.bias)
    model.cfg = model.cfg.replace(inference=dataclasses.replace(model.cfg.inference, cell_diameter=round(native, 2)))
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"samples": fit.samples, "rmse_log": fit.rmse_log, "held_out_rmse_log": held_out,
               "held_out_samples": len(y) - n_fit, "cell_diameter": round(native, 2),
               "scale_range": list(cfg.size_scale_range), "ridge": cfg.size_ridge}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("size model: %s", summary)
    dest = out / "model.safetensors"
    save_model(model, dest, version=cfg.version, metadata={"training": cfg.to_dict(), "size_fit": summary})
    return dest


def _with_size_head(model: CellSAM) -> CellSAM:
    """The same model with an (unfitted) size head added to its architecture."""
    from cellsam.models.build import build_model

    bigger = build_model(model.cfg.replace(size_head=True))
    missing, unexpected = bigger.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("size_head.") for k in missing):
        raise ValueError(f"could not add a size head: missing {missing}, unexpected {unexpected}")
    return bigger.eval()
