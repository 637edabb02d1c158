#!/usr/bin/env bash
# After stages 9-11 of configs/cpu_v12.yaml: ship (sweep) as documented for v11, then evaluate and click.
set -euxo pipefail
cd /work/wt_train
export PYTHONPATH=/work/wt_train
PY=/work/main/.venv/bin/python
$PY -c "import cellsam; assert cellsam.__file__.startswith('/work/wt_train/'), cellsam.__file__"
OUT=runs/v12
mkdir -p $OUT
s=$(date +%s)
$PY scripts/ship_default.py runs/cpu_v12/stage11/model.safetensors --name cellsam_cpu_v12 --version v12 \
    --recipe configs/cpu_v12.yaml --data prepared_hed --boxes 0.15 0.2 0.3 0.4 --ious 0.0 0.3 --tile-sizes 256 \
    --single-mask --local-decoding --box-threshold-rel 0.5 --out runs/ship_v12 > $OUT/ship.log 2>&1
echo "STEP ship $(( $(date +%s) - s )) s"
M=runs/ship_v12/cellsam_cpu_v12.safetensors
for split in val test; do
  $PY /tmp/wt_launch.py /work/wt_train evaluate --data prepared_hed --split $split --model $M --json $OUT/eval_$split.json --no-progress > $OUT/eval_$split.txt 2>&1
done
echo "STEP evals $(( $(date +%s) - s )) s"
$PY scripts/click_study.py $M --data prepared_hed --diameter segment --json $OUT/clicks.json > $OUT/clicks.txt 2>&1
echo "STEP clicks $(( $(date +%s) - s )) s"
