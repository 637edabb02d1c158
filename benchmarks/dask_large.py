"""Large-image throughput: ``segment_dask`` on a LocalCluster vs single-process ``segment``.

Writes a synthetic SIDE x SIDE uint16 image of bright disks to Zarr chunk by chunk (never whole in memory),
segments it through Dask (blocks -> OME-Zarr), samples the workers' and the client's memory while it runs,
and times single-process ``cellsam.segment`` on a crop of the same image for the pixels-per-second ratio.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/dask_large.py --side 20000 --workers 2 \\
        --model default --out benchmarks/dask_20k

``--model``: a weights name / checkpoint; ``random:VARIANT`` saves a randomly initialised VARIANT first
(speed is that of a trained model of the same size; the cells found are then meaningless).
Outputs ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def write_image(client, path: Path, side: int, chunk: int, seed: int = 0) -> None:
    """Disks of radius 6..14 px (about one per 75 x 75 px), generated per chunk on the workers."""
    import zarr

    arr = zarr.open_array(str(path), mode="w", shape=(side, side), chunks=(chunk, chunk), dtype=np.uint16)

    def fill(y0: int, x0: int) -> int:
        rng = np.random.default_rng([seed, y0, x0])
        h, w = min(chunk, side - y0), min(chunk, side - x0)
        img = rng.normal(300, 60, (h, w))
        yy, xx = np.mgrid[:h, :w]
        for _ in range(h * w // 5600):
            r = int(rng.integers(6, 15))
            if h <= 2 * r + 2 or w <= 2 * r + 2:
                continue
            cy, cx = int(rng.integers(r + 1, h - r - 1)), int(rng.integers(r + 1, w - r - 1))
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += 3000
        zarr.open_array(str(path), mode="r+")[y0 : y0 + h, x0 : x0 + w] = np.clip(img, 0, 65535).astype(
            np.uint16
        )
        return h * w

    starts = [(y, x) for y in range(0, side, chunk) for x in range(0, side, chunk)]
    client.gather(client.map(fill, [s[0] for s in starts], [s[1] for s in starts], pure=False))
    del arr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="4GB", help="per worker (Dask spills / pauses above it)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--crop", type=int, default=2048, help="side of the single-process comparison crop")
    ap.add_argument("--block-tiles", type=int, default=4)
    ap.add_argument(
        "--workdir", type=Path, default=None, help="where the input / output zarr go (default: tmp)"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/dask_large"))
    a = ap.parse_args()

    import psutil
    import zarr
    from distributed import Client, LocalCluster

    from cellsam.distributed.pipeline import segment_dask
    from cellsam.inference.segment import segment
    from cellsam.weights import load_model

    work = a.workdir or Path(tempfile.mkdtemp(prefix="cellsam_dask_"))
    work.mkdir(parents=True, exist_ok=True)
    model = a.model
    if model.startswith("random:"):
        import torch

        from cellsam.models.build import build_model
        from cellsam.weights import save_model

        torch.manual_seed(0)
        model = str(save_model(build_model(model.split(":", 1)[1]), work / "random", version="bench"))
    cluster = LocalCluster(
        n_workers=a.workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        memory_limit=a.memory_limit,
    )
    client = Client(cluster)
    src = work / "image.zarr"
    t = time.perf_counter()
    write_image(client, src, a.side, 1024)
    t_write = time.perf_counter() - t

    peak = {"workers_rss_max": 0, "workers_rss_sum_max": 0}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                rss = client.run(lambda: psutil.Process().memory_info().rss)
                peak["workers_rss_max"] = max(peak["workers_rss_max"], max(rss.values()))
                peak["workers_rss_sum_max"] = max(peak["workers_rss_sum_max"], sum(rss.values()))
            except Exception:  # noqa: BLE001 - sampling only
                pass
            stop.wait(2.0)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t = time.perf_counter()
    res = segment_dask(
        src, model, output=work / "labels.ome.zarr", client=client, block_tiles=a.block_tiles, device="cpu"
    )
    t_dask = time.perf_counter() - t
    stop.set()
    th.join()

    crop = zarr.open_array(str(src), mode="r")[: a.crop, : a.crop]
    t = time.perf_counter()
    res_crop = segment_dask(
        crop, model, output=work / "crop.ome.zarr", client=client, block_tiles=a.block_tiles, device="cpu"
    )
    t_dask_crop = time.perf_counter() - t
    client.close()
    cluster.close()
    net = load_model(model)
    t = time.perf_counter()
    single = segment(crop, net, device="cpu")
    t_single = time.perf_counter() - t

    px = a.side * a.side
    report = {
        "side": a.side,
        "workers": a.workers,
        "threads_per_worker": 1,
        "memory_limit": a.memory_limit,
        "model": a.model,
        "write_input_s": round(t_write, 1),
        "dask_s": round(t_dask, 1),
        "dask_mpx_per_s": round(px / t_dask / 1e6, 3),
        "cells": res.n_cells,
        "stats": res.stats,
        "levels": res.levels,
        "workers_rss_max_gb": round(peak["workers_rss_max"] / 2**30, 2),
        "workers_rss_sum_max_gb": round(peak["workers_rss_sum_max"] / 2**30, 2),
        "client_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "crop": a.crop,
        "crop_dask_s": round(t_dask_crop, 1),
        "crop_single_s": round(t_single, 1),
        "crop_dask_cells": res_crop.n_cells,
        "crop_single_cells": single.n_cells,
        "crop_dask_mpx_per_s": round(a.crop**2 / t_dask_crop / 1e6, 3),
        "crop_single_mpx_per_s": round(a.crop**2 / t_single / 1e6, 3),
        "cpu_count": psutil.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "workdir": str(work),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = [
        f"# Dask large image: {a.side} x {a.side} px, {a.workers} workers x 1 thread, model {a.model}",
        "",
        "| run | pixels | seconds | Mpx/s | cells |",
        "|---|---|---|---|---|",
        f"| Dask LocalCluster, whole image | {a.side}^2 | {report['dask_s']} | {report['dask_mpx_per_s']} | "
        f"{res.n_cells} |",
        f"| Dask LocalCluster, crop | {a.crop}^2 | {report['crop_dask_s']} | {report['crop_dask_mpx_per_s']} | "
        f"{res_crop.n_cells} |",
        f"| single process `segment`, crop | {a.crop}^2 | {report['crop_single_s']} | "
        f"{report['crop_single_mpx_per_s']} | {single.n_cells} |",
        "",
        f"Peak worker RSS {report['workers_rss_max_gb']} GB (sum over workers {report['workers_rss_sum_max_gb']}"
        f" GB, limit {a.memory_limit} each), client peak RSS {report['client_maxrss_gb']} GB; "
        f"{psutil.cpu_count()} CPUs, {report['ram_gb']} GB RAM.",
    ]
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
