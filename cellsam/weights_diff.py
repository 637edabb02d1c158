"""Tensor-by-tensor comparison of two weight files: shows whether a re-run reproduced a model.

A file's sha256 is no test of that across formats and versions: a training ``.ckpt``, a ``.pth`` or a
``.safetensors`` written by an older cellsam (its metadata in a random order) holds the same tensors
in other bytes. :func:`compare_weights` reads both state dicts and compares the tensors themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from cellsam.weights import CheckpointError, read_checkpoint, read_torch_state_dict, resolve_name

_SUFFIXES = (".safetensors", ".json", ".pth", ".pt", ".ckpt")


@dataclass
class TensorDiff:
    """One tensor present in both files with the same shape but other values."""

    name: str
    max_abs: float
    n_differ: int
    numel: int


@dataclass
class WeightsDiff:
    """Outcome of :func:`compare_weights`.

    ``identical`` is True when both files hold the same tensor names, shapes, dtypes and every value
    is within ``atol`` (bit-identical for ``atol=0``).
    """

    n_tensors: int
    n_equal: int
    atol: float
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # same name, other shape or dtype
    differ: list[TensorDiff] = field(default_factory=list)  # sorted by max_abs, largest first

    @property
    def identical(self) -> bool:
        return not (self.only_a or self.only_b or self.mismatched or self.differ)

    @property
    def max_abs(self) -> float:
        return max((d.max_abs for d in self.differ), default=0.0)

    def summary(self, top: int = 10) -> str:
        """A few lines for people: the verdict, then the largest differences."""
        kind = "bit-identical" if self.atol == 0 else f"equal within atol={self.atol:g}"
        verdict = (f"{kind}: all {self.n_tensors} tensors" if self.identical
                   else f"NOT {kind}: {self.n_equal} of {self.n_tensors} shared tensors equal, "
                        f"{len(self.differ)} differ (max abs difference {self.max_abs:.3g})")
        lines = [verdict]
        for label, names in (("only in A", self.only_a), ("only in B", self.only_b),
                             ("other shape or dtype", self.mismatched)):
            if names:
                lines.append(f"{label} ({len(names)}): {', '.join(names[:top])}"
                             + (" ..." if len(names) > top else ""))
        for d in self.differ[:top]:
            lines.append(f"  {d.name}: max abs {d.max_abs:.3g}, {d.n_differ} of {d.numel} values differ")
        if len(self.differ) > top:
            lines.append(f"  ... and {len(self.differ) - top} more")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one of our ``.safetensors`` files (or its ``.json``), a ``.pth``/``.pt`` file, a
    training checkpoint (``.ckpt``, its ``model.`` prefix removed) or registered weights by name
    (``"default"``)."""
    path = Path(path)
    if not path.exists() and len(path.parts) == 1 and path.suffix not in _SUFFIXES:
        path = resolve_name(str(path))  # a name, not a file
    if not path.is_file() and not path.with_suffix(".safetensors").is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix in (".safetensors", ".json"):
        return read_checkpoint(path)[1]
    if path.suffix in (".pth", ".pt", ".ckpt"):
        state = read_torch_state_dict(path)
        if path.suffix == ".ckpt" and all(k.startswith("model.") for k in state):
            state = {k[len("model."):]: v for k, v in state.items()}  # our Lightning module's prefix
        return state
    raise CheckpointError(f"{path}: expected a {', '.join(_SUFFIXES)} file")


def compare_state_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *,
                        atol: float = 0.0) -> WeightsDiff:
    """Compare two state dicts tensor by tensor; NaNs in the same places count as equal."""
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    shared = sorted(set(a) & set(b))
    diff = WeightsDiff(n_tensors=len(set(a) | set(b)), n_equal=0, atol=atol,
                       only_a=sorted(set(a) - set(b)), only_b=sorted(set(b) - set(a)))
    for name in shared:
        ta, tb = a[name].detach().cpu(), b[name].detach().cpu()
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            diff.mismatched.append(name)
            continue
        if ta.is_floating_point() or ta.is_complex():
            both_nan = torch.isnan(ta) & torch.isnan(tb)
            delta = torch.where(both_nan, torch.zeros_like(ta), ta - tb).abs().double()
            delta = torch.nan_to_num(delta, nan=float("inf"))  # NaN on one side only: maximal difference
        else:
            delta = (ta.long() - tb.long()).abs().double()
        bad = delta > atol
        n_bad = int(bad.sum())
        if n_bad == 0:
            diff.n_equal += 1
        else:
            diff.differ.append(TensorDiff(name, float(delta.max()), n_bad, ta.numel()))
    diff.differ.sort(key=lambda d: d.max_abs, reverse=True)
    return diff


def compare_weights(path_a: str | Path, path_b: str | Path, *, atol: float = 0.0) -> WeightsDiff:
    """Compare the tensors of two weight files (see :func:`read_state_dict` for the formats)."""
    return compare_state_dicts(read_state_dict(path_a), read_state_dict(path_b), atol=atol)
