#!/usr/bin/env bash
# How v3 was shipped and measured (2-core CPU, nothing else running), after
#   cellsam train --config configs/cpu_v3.yaml
set -euxo pipefail
export OMP_WAIT_POLICY=PASSIVE
python scripts/ship_default.py runs/cpu_v3/stage2/model.safetensors --name cellsam_cpu_v3 --version v3 \
    --recipe configs/cpu_v3.yaml --data prepared --sweep-images 16 --boxes 0.2 0.3 0.4 0.5 --ious 0.0 0.3 \
    --tile-sizes 256 320 --single-mask --out runs/ship_v3 2>&1 | tee runs/ship_v3.log
M=runs/ship_v3/cellsam_cpu_v3.safetensors
cellsam evaluate --data prepared --split val --model "$M" --prompt-study --json runs/eval_v3_val.json \
    --plots runs/v3_plots --worst 6 --no-progress 2>&1 | tail -40
python scripts/box_recall.py /tmp/v3_step500.ckpt "$M" /tmp/cellsam_cpu_v2.safetensors --box-threshold 0.3 \
    --json benchmarks/detector_study/box_recall.json
python scripts/click_study.py "$M" --json benchmarks/detector_study/clicks_v3.json
# (v2: cellsam_cpu_v2.safetensors + .json from the git history, copied to /tmp; the step-500 checkpoint
#  of stage 1 copied to /tmp/v3_step500.ckpt)
OMP_WAIT_POLICY=PASSIVE cellsam bench --model default --sizes 512 --cells 100 --real dense512 mosaic2048 \
    --real-data ../shared/data/dsb2018 --cellpose --cellpose-path /tmp/cp3 --repeats 2 --warmup 1 --no-parity \
    --out benchmarks/cpu_v3_real
