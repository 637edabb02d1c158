"""Checkpoints, the weights cache and ``load_model``.

Our checkpoint format is two files with the same stem::

    NAME.safetensors   the state dict (format, variant, version and config also in its header metadata)
    NAME.json          {"format": "cellsam", "config": CellSAMConfig.to_dict(), "variant", "version",
                        "preprocessing", "training_data", "sha256" (of NAME.safetensors), "cellsam_version"}

:func:`load_model` accepts a registered weights name or alias (``"default"``), one of our
checkpoints, a Meta SAM ``.pth`` or an official CellSAM ``.pt``; loading is always strict.
Registered weights are fetched by :func:`download` into the cache directory
(``$CELLSAM_HOME``, default ``~/.cache/cellsam``) and verified by sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cellsam.config import CellSAMConfig
from cellsam.registry import WeightsRecord, get_config, get_weights, list_variants, list_weights

if TYPE_CHECKING:
    from cellsam.models.cellsam import CellSAM

logger = logging.getLogger(__name__)

FORMAT = "cellsam"
FORMAT_VERSION = 1
HEADER_KEY = "cellsam"  # the safetensors metadata entry: JSON of format, variant, version and config
DEFAULT_PREPROCESSING = (
    "channels (R empty, G nuclear, B whole-cell); each channel clipped at the 99.9th percentile of its "
    "nonzero values, rescaled to [0, 1], CLAHE (kernel 128); longest side resized to the encoder input "
    "and padded; SAM pixel mean/std applied to x * 255"
)
_RESERVED = {"format", "format_version", "config", "sha256", "cellsam_version", "version"}
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint is unreadable, inconsistent or does not match the model."""


# ---------------------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """The weights cache: ``$CELLSAM_HOME`` if set, else ``~/.cache/cellsam`` (not created here)."""
    env = os.environ.get("CELLSAM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cellsam"


def cached_path(record: WeightsRecord) -> Path:
    """Where :func:`download` puts ``record`` (for ``package:`` weights: the bundled file)."""
    if record.url.startswith("package:"):
        return _package_path(record.url)
    return cache_dir() / "weights" / f"{record.name}.safetensors"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _package_path(url: str) -> Path:
    rel = url[len("package:") :].strip("/")
    if not rel or ".." in Path(rel).parts:
        raise ValueError(
            f"bad package URL {url!r}: expected 'package:<path relative to the cellsam package>'"
        )
    return Path(str(resources.files("cellsam").joinpath(rel)))


def _check_hash(path: Path, expected: str, *, source: str) -> None:
    got = sha256_file(path)
    if got != expected.strip().lower():
        raise CheckpointError(f"sha256 mismatch for {source}: expected {expected}, got {got} ({path})")


def download(record: WeightsRecord, *, force: bool = False) -> Path:
    """Fetch ``record`` into the cache (if needed), verify its sha256 and return its local path.

    ``record.url`` may be ``http(s)://`` or ``file://`` (streamed to a temporary file in the cache,
    verified, then atomically renamed; on a mismatch the file is deleted and ``CheckpointError``
    names both hashes), or ``package:<relative path>`` for weights bundled in the ``cellsam``
    package (e.g. ``package:weights/NAME.safetensors``; verified in place, never copied).
    An already cached file is re-verified; ``force`` downloads it again.
    """
    url = record.url
    if url.startswith("package:"):
        path = _package_path(url)
        if not path.is_file():
            raise FileNotFoundError(
                f"weights {record.name!r} should be bundled in the package at {path}, "
                "but that file is missing"
            )
        _check_hash(path, record.sha256, source=f"bundled weights {record.name!r}")
        return path
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("http", "https", "file"):
        raise ValueError(
            f"weights {record.name!r}: unsupported URL {url!r} (use http(s)://, file:// or package:)"
        )
    dest = cached_path(record)
    if dest.is_file() and not force:
        if sha256_file(dest) == record.sha256.strip().lower():
            return dest
        logger.warning("cached %s does not match its sha256; downloading it again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        logger.info("downloading %s from %s", record.name, url)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (schemes checked)
                    for block in iter(lambda: response.read(_CHUNK), b""):
                        h.update(block)
                        out.write(block)
            except (urllib.error.URLError, OSError) as e:
                raise OSError(f"could not download weights {record.name!r} from {url}: {e}") from e
        got, expected = h.hexdigest(), record.sha256.strip().lower()
        if got != expected:
            raise CheckpointError(
                f"sha256 mismatch for weights {record.name!r} from {url}: expected {expected}, got {got}; "
                "the downloaded file was deleted"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ---------------------------------------------------------------------------------------- save
def variant_of(cfg: CellSAMConfig) -> str | None:
    """The registered architecture ``cfg`` is (its inference defaults, which belong to trained weights, aside)."""
    for name in list_variants():
        if get_config(name).replace(inference=cfg.inference) == cfg:
            return name
    return None


def save_model(
    model: nn.Module, path: str | Path, *, version: str, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` as ``<stem>.safetensors`` + ``<stem>.json``; returns the safetensors path.

    Args:
        model: a :class:`~cellsam.models.cellsam.CellSAM` (needs ``model.cfg``).
        path: target path; a ``.safetensors`` or ``.json`` suffix is replaced, any other kept.
        version: version tag of these weights (e.g. ``"v1"``).
        metadata: extra JSON fields, e.g. ``variant``, ``preprocessing``, ``training_data``,
            ``description``, ``license``. The keys ``format, format_version, config, sha256,
            cellsam_version, version`` are reserved.
    """
    from safetensors.torch import save_file

    from cellsam import __version__

    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, CellSAMConfig):
        raise TypeError(
            f"save_model needs a CellSAM model with a .cfg CellSAMConfig, got {type(model).__name__}"
        )
    meta = dict(metadata or {})
    clash = sorted(_RESERVED & set(meta))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved")
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    st_path, json_path = Path(f"{stem}.safetensors"), Path(f"{stem}.json")
    st_path.parent.mkdir(parents=True, exist_ok=True)
    variant = meta.pop("variant", None) or variant_of(cfg) or "custom"
    # clone: breaks storage sharing (tied heads), which safetensors refuses to write
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    # One metadata entry, its JSON with sorted keys: safetensors writes its metadata map in a random
    # order per process, so several entries would give the same weights a different file and sha256.
    record = {"format": FORMAT, "variant": variant, "version": str(version), "config": cfg.to_dict()}
    save_file(tensors, str(st_path), metadata={HEADER_KEY: json.dumps(record, sort_keys=True)})
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": variant,
        "version": str(version),
        "preprocessing": meta.pop("preprocessing", DEFAULT_PREPROCESSING),
        "training_data": meta.pop("training_data", "unspecified"),
        "sha256": sha256_file(st_path),
        "cellsam_version": __version__,
        **meta,
        "config": cfg.to_dict(),
    }
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    return st_path


# ---------------------------------------------------------------------------------------- load
def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str) -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with errors that name every bad key.

    Raises:
        CheckpointError: listing missing keys, unexpected keys, or a key with both shapes.
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model: missing keys {_few(missing)}; "
            f"unexpected keys {_few(unexpected)}"
        )
    for k, v in state_dict.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {k!r}: "
                f"checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
            )
    model.load_state_dict(state_dict, strict=True)


def _few(keys: list[str], n: int = 12) -> str:
    return "[]" if not keys else str(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _header_record(header: dict[str, str], st_path: Path) -> dict[str, Any]:
    """The format / variant / version / config record of a safetensors header ({} if it has none)."""
    try:
        if HEADER_KEY in header:
            record = json.loads(header[HEADER_KEY])
        elif "cellsam_config" in header:  # older files: one metadata entry per field
            record = {**header, "config": json.loads(header["cellsam_config"])}
            del record["cellsam_config"]
        else:
            record = {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{st_path} carries a model config that is not valid JSON: {e}") from e
    return record if isinstance(record, dict) else {}


def read_checkpoint(
    path: str | Path, *, verify: bool = True
) -> tuple[CellSAMConfig, dict[str, torch.Tensor], dict]:
    """Read one of our checkpoints (``.safetensors`` or its ``.json``): (config, state dict, JSON doc).

    The config comes from the JSON beside the file, else from the safetensors header. With
    ``verify``, the file's sha256 must equal the JSON's.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    st_path, json_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    if not st_path.is_file():
        raise FileNotFoundError(f"checkpoint file {st_path} not found")
    doc: dict[str, Any] = {}
    if json_path.is_file():
        try:
            doc = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{json_path} is not valid JSON: {e}") from e
        if verify and "sha256" in doc:
            _check_hash(st_path, str(doc["sha256"]), source=f"{st_path} (its JSON records another hash)")
    try:
        with safe_open(str(st_path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"could not read {st_path} as a safetensors file: {e}") from e
    if "config" not in doc:  # no JSON beside the file: the record in the safetensors header
        doc = _header_record(header, st_path)
        if "config" not in doc:
            raise CheckpointError(f"{st_path} carries no model config and {json_path} is missing")
    cfg_dict = doc["config"]
    try:
        cfg = CellSAMConfig.from_dict(cfg_dict)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"bad model config in checkpoint {st_path}: {e}") from e
    return cfg, state, doc


def read_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt`` file, read with ``weights_only=True`` on the CPU.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers and a DDP ``module.`` prefix.
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle, zip and EOF errors all mean an unreadable file
        raise CheckpointError(
            f"could not read {path} as a PyTorch checkpoint (weights_only=True): {e}"
        ) from e
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _load_torch_file(path: Path) -> CellSAM:
    from cellsam import convert
    from cellsam.models.build import build_model

    sd = read_torch_state_dict(path)
    kind = convert.checkpoint_kind(sd)
    if kind == "official":
        cfg, ours = convert.official_state_dict_to_cellsam(sd)
        model = build_model(cfg)
        load_state_dict_strict(model, ours, source=f"official CellSAM checkpoint {path}")
        return model
    if kind == "sam":
        cfg = convert.sam_config_from_state_dict(sd)
        model = build_model(cfg)
        sam_sd = convert.sam_state_dict_to_cellsam(sd)
        full = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] not in convert.SAM_MODULES}
        load_state_dict_strict(model, {**full, **sam_sd}, source=f"Meta SAM checkpoint {path}")
        logger.warning(
            "loaded the SAM parts of %s; CellFinder is randomly initialised and UNTRAINED: detect() and "
            "automatic segmentation give meaningless boxes until it is trained",
            path,
        )
        return model
    sample = sorted(sd)[:5]
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (first keys {sample}); expected Meta SAM keys image_encoder.* / "
        "prompt_encoder.* / mask_decoder.* or official CellSAM keys model.* / cellfinder.decode_head.*"
    )


def resolve_name(name: str) -> Path:
    """The local file of registered weights ``name`` (or an alias such as ``"default"``), fetched and
    verified by :func:`download` if needed; a KeyError that lists the registered names otherwise."""
    try:
        record = get_weights(name)
    except KeyError:
        if name == "default":
            raise KeyError(
                "no weights are registered under 'default': the shipped model must be registered with "
                "cellsam.registry.register_weights(record, aliases=('default',)); "
                f"registered weights: {list_weights()}"
            ) from None
        if name in list_variants():
            raise KeyError(
                f"{name!r} is an architecture variant, not trained weights; "
                f"use cellsam.build_model({name!r}) "
                f"for a randomly initialised model, or one of the weights {list_weights()}"
            ) from None
        raise KeyError(
            f"{name!r} is neither a file nor registered weights; registered: {list_weights()}"
        ) from None
    return download(record)


def load_model(name_or_path: str | Path, *, device: str | torch.device | None = None) -> CellSAM:
    """Load a :class:`~cellsam.models.cellsam.CellSAM` in eval mode, strictly.

    Args:
        name_or_path: a registered weights name or alias (``"default"``; see :func:`list_models`),
            our checkpoint (``X.safetensors`` with ``X.json`` beside it, or the ``.json``), a Meta
            SAM ``.pth`` (SAM parts loaded, CellFinder left untrained, with a warning) or an
            official CellSAM ``.pt``.
        device: where to put the model; ``None`` = CPU.
    Raises:
        KeyError: unknown name; FileNotFoundError: missing file; CheckpointError (a ValueError):
        unreadable file, hash mismatch, or missing / unexpected / mis-shaped keys (named).
    """
    from cellsam.models.build import build_model

    path = Path(name_or_path)
    if not path.exists():
        looks_like_path = (
            isinstance(name_or_path, Path)
            or os.sep in str(name_or_path)
            or path.suffix in (".safetensors", ".json", ".pth", ".pt")
        )
        if looks_like_path:
            raise FileNotFoundError(f"checkpoint {path} not found")
        path = resolve_name(str(name_or_path))
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file")
    if path.suffix in (".safetensors", ".json"):
        cfg, state, _ = read_checkpoint(path)
        model = build_model(cfg)
        load_state_dict_strict(model, state, source=f"checkpoint {path.with_suffix('.safetensors')}")
    else:
        model = _load_torch_file(path)
    return model.to(torch.device(device) if device is not None else "cpu").eval()


def list_models() -> list[str]:
    """Names of the architecture variants and of the registered weights (with aliases)."""
    return sorted(set(list_variants()) | set(list_weights()))
