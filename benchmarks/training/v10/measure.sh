#!/usr/bin/env bash
# The v10 arm (v6 continued on the hematoxylin channel, #18), 2-core CPU, 2026-12-05: trained,
# swept and compared with the shipped v6 (v6's numbers: benchmarks/training/v8/eval_v6_*, same inference code).
# Run from the repository root with the venv active.
set -euxo pipefail
export OMP_WAIT_POLICY=PASSIVE
OUT=benchmarks/training/v10
# the data: stained pictures as hematoxylin, recorded in dataset.json so that a model trained on it carries the rule
cellsam prepare ../shared/data/dsb2018 ../shared/data/deepcell1 ../shared/data/monuseg -o prepared_hed \
    --stain-grey hematoxylin --no-progress
# stages 6-8 continue v6 (runs/cpu_v6/stage5, its pre-ship model)
#   cellsam train --config configs/cpu_v10.yaml --skip-done > runs/cpu_v10/train.log
python scripts/ship_default.py runs/cpu_v10/stage8/model.safetensors --name cellsam_cpu_v10 --version v10 \
    --recipe configs/cpu_v10.yaml --data prepared_hed --sweep-images 16 --boxes 0.15 0.2 0.3 0.4 --ious 0.0 0.3 \
    --tile-sizes 256 --single-mask --local-decoding --box-threshold-rel 0.5 --out runs/ship_v10 > $OUT/ship.log 2>&1
V10=runs/ship_v10/cellsam_cpu_v10.safetensors
for split in val test; do
  cellsam evaluate --data prepared_hed --split $split --model $V10 --json $OUT/eval_v10_$split.json --no-progress > $OUT/eval_v10_$split.txt
done
python scripts/click_study.py $V10 --data prepared_hed --diameter segment --json $OUT/clicks.json > $OUT/clicks.txt
