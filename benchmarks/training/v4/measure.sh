#!/usr/bin/env bash
# How v4 was trained, shipped and measured (2-core CPU), 2026-12-03.
set -euxo pipefail
export OMP_WAIT_POLICY=PASSIVE
# stages 1-2 are v3's: this machine started from the bundled v3 weights (= v3's stage-2 model)
mkdir -p runs/cpu_v3/stage2 && cp cellsam/pretrained/cellsam_cpu_v3.safetensors runs/cpu_v3/stage2/model.safetensors
cellsam train --config configs/cpu_v4.yaml --skip-done          # stages 3-5 (resumed once with --resume)
python scripts/local_decoding_ab.py runs/cpu_v4/stage5/model.safetensors --images 72 --json /tmp/ab_v4.json
python scripts/ship_default.py runs/cpu_v4/stage5/model.safetensors --name cellsam_cpu_v4 --version v4 \
    --recipe configs/cpu_v4.yaml --data prepared --sweep-images 16 --boxes 0.2 0.3 0.4 0.5 --ious 0.0 0.3 \
    --tile-sizes 256 --single-mask --local-decoding --out runs/ship_v4
python scripts/scale_study.py default --scales 0.5 1 2 --json benchmarks/scale_study.json \
    --markdown benchmarks/scale_study.md
cellsam evaluate --data prepared --split val --model default --prompt-study --json benchmarks/accuracy_val.json \
    --plots benchmarks/accuracy_plots --worst 6 --no-progress
python scripts/click_study.py cellsam/pretrained/cellsam_cpu_v4.safetensors --json benchmarks/detector_study/clicks_v4.json
python scripts/box_recall.py /tmp/cellsam_cpu_v3.safetensors cellsam/pretrained/cellsam_cpu_v4.safetensors \
    --box-threshold 0.3 --json benchmarks/detector_study/box_recall_v4.json
cellsam bench --model default --sizes 512 --cells 100 --real dense512 mosaic2048 --real-data ../shared/data/dsb2018 \
    --cellpose --cellpose-path /tmp/cp3 --repeats 2 --warmup 1 --no-parity --diameter none auto --out benchmarks/cpu_v4_real
cellsam bench --model default --sizes 512 --cells 100 --repeats 3 --warmup 1 --no-parity --busy-neighbour 2 \
    --out benchmarks/cpu_v4_busy
