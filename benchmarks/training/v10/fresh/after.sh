#!/usr/bin/env bash
# After the fresh run of the one command: ship (sweep) as documented, then evaluate beside the bundled v10.
set -euxo pipefail
cd /work/train_wt
export PYTHONPATH=/work/train_wt
PY=/work/main/.venv/bin/python
$PY -c "import cellsam; assert cellsam.__file__.startswith('/work/train_wt/'), cellsam.__file__"
OUT=runs/fresh
mkdir -p $OUT
s=$(date +%s)
$PY scripts/ship_default.py runs/cpu_v10/stage8/model.safetensors --name cellsam_cpu_v11 --version v11 \
    --recipe configs/cpu_v10.yaml --data prepared_hed --boxes 0.15 0.2 0.3 0.4 --ious 0.0 0.3 --tile-sizes 256 \
    --single-mask --local-decoding --box-threshold-rel 0.5 --out runs/ship_fresh > $OUT/ship.log 2>&1
echo "STEP ship $(( $(date +%s) - s )) s"
M=runs/ship_fresh/cellsam_cpu_v11.safetensors
for split in val test; do
  $PY /tmp/wt_launch.py /work/train_wt evaluate --data prepared_hed --split $split --model $M --json $OUT/eval_$split.json --no-progress > $OUT/eval_$split.txt 2>&1
done
echo "STEP evals $(( $(date +%s) - s )) s"
$PY scripts/click_study.py $M --data prepared_hed --diameter segment --json $OUT/clicks.json > $OUT/clicks.txt 2>&1
echo "STEP clicks $(( $(date +%s) - s )) s"
