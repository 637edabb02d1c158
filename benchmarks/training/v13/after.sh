#!/usr/bin/env bash
# After stages 9-11 of configs/cpu_v13.yaml: ship (sweep) as for v12, then evaluate val and test and click.
set -euxo pipefail
cd /work/wt_v13
export PYTHONPATH=/work/wt_v13
PY=/work/main/.venv/bin/python
$PY -c "import cellsam; assert cellsam.__file__.startswith('/work/wt_v13/'), cellsam.__file__"
OUT=runs/v13
mkdir -p $OUT
s=$(date +%s)
$PY scripts/ship_default.py runs/cpu_v13/stage11/model.safetensors --name cellsam_cpu_v13 --version v13 \
    --recipe configs/cpu_v13.yaml --data prepared_hed --boxes 0.15 0.2 0.3 0.4 --ious 0.0 0.3 --tile-sizes 256 \
    --single-mask --local-decoding --box-threshold-rel 0.5 --out runs/ship_v13 > $OUT/ship.log 2>&1
echo "STEP ship $(( $(date +%s) - s )) s"
M=runs/ship_v13/cellsam_cpu_v13.safetensors
for split in val test; do
  $PY /tmp/wt_run.py /work/wt_v13 /tmp/cli.py evaluate --data prepared_hed --split $split --model $M --json $OUT/eval_$split.json --no-progress > $OUT/eval_$split.txt 2>&1
done
echo "STEP evals $(( $(date +%s) - s )) s"
$PY scripts/click_study.py $M --data prepared_hed --diameter segment --json $OUT/clicks.json > $OUT/clicks.txt 2>&1
echo "STEP clicks $(( $(date +%s) - s )) s"
