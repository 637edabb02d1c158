"""The Dask side of cellsam: clients, one model per worker, retries and failure reports.

- :func:`get_client`: a ``LocalCluster`` (processes, 1 thread each) by default, or any running
  scheduler by address (``tcp://host:8786``), or a given ``Client``.
- :func:`worker_model`: the model is loaded once per worker process and cached under its name / path
  and device; a model object is scattered once to every worker.
- Every task is submitted with Dask ``retries``; a task that still fails is reported with its position
  (:class:`BlockFailure`) and nothing is written for it — the run raises, it never writes an empty block.
- The pipeline that uses them is :func:`cellsam.distributed.pipeline.segment_dask`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}
_LOCK = threading.Lock()
LOADS: list[str] = []  # names loaded in this process (tests read it to prove "once per worker")


class BlockFailure(RuntimeError):
    """Blocks / regions that failed after all retries, as ``(position, reason)`` pairs."""

    def __init__(self, stage: str, failures: list[tuple[str, str]]) -> None:
        self.stage, self.failures = stage, failures
        lines = "\n".join(f"  {pos}: {why}" for pos, why in failures)
        super().__init__(
            f"{len(failures)} task(s) of stage '{stage}' failed after retries; nothing written "
            f"for them:\n{lines}"
        )


def worker_model(model: Any, device: Any = None) -> tuple[Any, Any]:
    """(model, device) in eval mode, loaded at most once per process for a name / path."""
    from cellsam.inference.runtime import resolve_device, resolve_model

    if not isinstance(model, (str, os.PathLike)):
        net, dev = resolve_model(model, device)
    else:
        key = (str(model), str(device))
        with _LOCK:
            if key not in _MODELS:
                from cellsam.weights import load_model

                dev = resolve_device(device)
                _MODELS[key] = (load_model(model if isinstance(model, str) else Path(model), device=dev), dev)
                LOADS.append(str(model))
            net, dev = _MODELS[key]
    if hasattr(net, "eval"):
        net.eval()
    return net, dev


def get_client(
    address: Any = None, *, n_workers: int | None = None, threads_per_worker: int = 1
) -> tuple[Any, bool]:
    """(client, owned): ``address`` None / "local" starts a LocalCluster; owned: made here (close it with
    :func:`close_client`, which also stops a LocalCluster made here, never a remote cluster)."""
    from distributed import Client, LocalCluster

    if isinstance(address, Client):
        return address, False
    if address is None or address == "local":
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True, dashboard_address=None
        )
        return Client(cluster), True
    if not isinstance(address, str):
        raise TypeError(
            f"address must be a scheduler address string or a distributed.Client, got {address!r}"
        )
    return Client(address), True


def close_client(client: Any) -> None:
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def wait_all(stage: str, futures: dict[str, Any]) -> dict[str, Any]:
    """Wait for ``{position: future}``; raise :class:`BlockFailure` naming every failed position."""
    from distributed import wait

    wait(list(futures.values()))
    bad = [
        (pos, f"{type(f.exception()).__name__}: {f.exception()}")
        for pos, f in futures.items()
        if f.status != "finished"
    ]
    if bad:
        raise BlockFailure(stage, bad)
    return futures
