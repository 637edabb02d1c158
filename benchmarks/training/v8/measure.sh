#!/usr/bin/env bash
# The v8 arm (training-time inversion, #18), 2-core CPU, 2026-12-04: trained, swept and compared with the shipped
# v6 on the same prepared data. Run from the repository root with the venv active. v6's numbers with
# polarity="auto": benchmarks/polarity.md and benchmarks/accuracy.md (same inference code).
set -euxo pipefail
export OMP_WAIT_POLICY=PASSIVE
OUT=benchmarks/training/v8
# stages 3-5 from v3's stage-2 model (runs/cpu_v3/stage2 = the v3 weights, git show f90107a:...)
#   cellsam train --config configs/cpu_v8.yaml --skip-done > runs/cpu_v8/train.log
python scripts/ship_default.py runs/cpu_v8/stage5/model.safetensors --name cellsam_cpu_v8 --version v8 \
    --recipe configs/cpu_v8.yaml --data prepared --sweep-images 16 --boxes 0.15 0.2 0.3 0.4 --ious 0.0 0.3 \
    --tile-sizes 256 --single-mask --local-decoding --box-threshold-rel 0.5 --out runs/ship_v8 > $OUT/ship.log 2>&1
V8=runs/ship_v8/cellsam_cpu_v8.safetensors
for split in val test; do
  cellsam evaluate --data prepared --split $split --model $V8 --json $OUT/eval_v8_$split.json --no-progress > $OUT/eval_v8_$split.txt
done
for split in val test; do  # v6 (the shipped default) with the same pipeline defaults (min_area_rel 0.15)
  cellsam evaluate --data prepared --split $split --model default --json $OUT/eval_v6_$split.json --no-progress > $OUT/eval_v6_$split.txt
done
# not run for v8 (the ship rule had already failed on the lines above):
python scripts/polarity_study.py $V8 --json $OUT/polarity_v8.json > $OUT/polarity_v8.txt
python scripts/click_study.py $V8 --diameter segment --json $OUT/clicks.json > $OUT/clicks.txt
python scripts/box_recall.py default $V8 --box-threshold 0.3 --json $OUT/box_recall.json > $OUT/box_recall.txt
python scripts/miss_study.py $V8 --scale true --json $OUT/miss_v8.json > $OUT/miss_v8.txt
