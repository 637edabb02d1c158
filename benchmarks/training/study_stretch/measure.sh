#!/usr/bin/env bash
# The stretch study arm (#18, elongated objects), 2-core CPU, 2026-12-04: v5's recipe with an
# area-preserving stretch augmentation in joint stage 3 (configs/study_stretch.yaml), compared with the
# shipped v5 on the same (current) prepared data.
set -euxo pipefail
export OMP_WAIT_POLICY=PASSIVE
OUT=benchmarks/training/study_stretch
# stages 3-5 from v3's stage-2 model, as v5 was trained (runs/cpu_v3/stage2 present)
#   cellsam train --config configs/study_stretch.yaml --skip-done      # 01:40 -> see train.log
python scripts/ship_default.py runs/study_stretch/stage5/model.safetensors --name cellsam_cpu_stretch \
    --version stretch --recipe configs/study_stretch.yaml --data prepared --sweep-images 16 \
    --boxes 0.2 0.3 0.4 0.5 --ious 0.0 0.3 --tile-sizes 256 --single-mask --local-decoding \
    --out runs/ship_stretch > $OUT/ship.log 2>&1
S=runs/ship_stretch/cellsam_cpu_stretch.safetensors
for split in val test; do
  cellsam evaluate --data prepared --split $split --model default --json $OUT/eval_v5_$split.json --no-progress > $OUT/eval_v5_$split.txt
  cellsam evaluate --data prepared --split $split --model $S --json $OUT/eval_stretch_$split.json --no-progress > $OUT/eval_stretch_$split.txt
  python scripts/elongation_study.py $OUT/eval_v5_$split.json $OUT/eval_stretch_$split.json --names v5 stretch \
      --split $split --json $OUT/elongation_$split.json > $OUT/elongation_$split.txt
done
python scripts/box_recall.py default $S --box-threshold 0.3 --json $OUT/box_recall.json > $OUT/box_recall.txt
python scripts/click_study.py default $S --diameter segment --json $OUT/clicks.json > $OUT/clicks.txt
