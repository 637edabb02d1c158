#!/usr/bin/env bash
# Every committed CPU benchmark, as run on the 2-core machine (nothing else running).
# Needs: .venv with the package, Cellpose 3 in /tmp/cp3 (benchmarks/README.md), the shipped default model.
set -euxo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
B=.venv/bin/cellsam
# ours vs the reference CellSAM structure (vit_b, random weights) and Cellpose 3, 512x512 tiles
$B bench --model vit_b --sizes 512 --cells 10 100 500 --precision fp32 bf16 --repeats 1 --warmup 1 \
    --reference --cellpose --cellpose-path /tmp/cp3 --out benchmarks/cpu_vit_b_vs_reference
# the shipped model vs Cellpose 3
$B bench --model default --sizes 512 --cells 10 100 500 --precision fp32 bf16 --repeats 3 --warmup 1 --decode-window 3 0 \
    --cellpose --cellpose-path /tmp/cp3 --out benchmarks/cpu_default_vs_cellpose
# interactive prompts on a cached embedding
$B bench --prompts --model default --repeats 50 --warmup 5 --out benchmarks/cpu_default_prompts
# scaling with image area
$B bench --model default --sizes 256 512 1024 2048 --cells 100 --precision fp32 --repeats 1 --warmup 1 \
    --out benchmarks/cpu_default_scaling
# a 20,000 x 20,000 synthetic image through Dask (2 workers x 1 thread), memory sampled (~25 min)
.venv/bin/python benchmarks/dask_large.py --side 20000 --workers 2 --model default --out benchmarks/dask_20k
