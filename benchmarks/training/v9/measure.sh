#!/usr/bin/env bash
# The v9 arm (hematoxylin channel for stained bright-field pictures, #18), 2-core CPU, 2026-12-05: trained,
# swept and compared with the shipped v6 (v6's numbers: benchmarks/training/v8/eval_v6_*, same inference code).
# Run from the repository root with the venv active.
set -euxo pipefail
export OMP_WAIT_POLICY=PASSIVE
OUT=benchmarks/training/v9
# the data: stained pictures as hematoxylin (the study script that trained stages 3-4 gave byte-identical tiles,
# checked below), recorded in dataset.json so that a model trained on it carries the rule
cellsam prepare ../shared/data/dsb2018 ../shared/data/deepcell1 ../shared/data/monuseg -o prepared_hed \
    --stain-grey hematoxylin --no-progress
# stages 3-5 from v3's stage-2 model (runs/cpu_v3/stage2 = the v3 weights, git show f90107a:...)
#   cellsam train --config configs/cpu_v9.yaml --skip-done > runs/cpu_v9/train.log
python scripts/ship_default.py runs/cpu_v9/stage5/model.safetensors --name cellsam_cpu_v9 --version v9 \
    --recipe configs/cpu_v9.yaml --data prepared_hed --sweep-images 16 --boxes 0.15 0.2 0.3 0.4 --ious 0.0 0.3 \
    --tile-sizes 256 --single-mask --local-decoding --box-threshold-rel 0.5 --out runs/ship_v9 > $OUT/ship.log 2>&1
V9=runs/ship_v9/cellsam_cpu_v9.safetensors
for split in val test; do
  cellsam evaluate --data prepared_hed --split $split --model $V9 --json $OUT/eval_v9_$split.json --no-progress > $OUT/eval_v9_$split.txt
done
python scripts/click_study.py $V9 --data prepared_hed --diameter segment --json $OUT/clicks.json > $OUT/clicks.txt
