#!/bin/bash
# After scripts/train_cellpose_baseline.py ... --name cellpose_v12budget: evaluate it on val and test
# (data prepared as it was trained: `prepared`, luminance), as the earlier Cellpose baselines were.
set -u
cd /work/main
M=runs/cellpose_v12budget/models/cellpose_v12budget
OUT=benchmarks/training/cellpose_v12budget
cp runs/cellpose_v12budget/cellpose_v12budget.json $OUT/record.json
for split in val test; do
  PYTHONPATH=/tmp/cp3 OMP_NUM_THREADS=2 .venv/bin/cellsam evaluate --data prepared --split $split --model none \
    --baseline cellpose_v12budget=cellpose:$M --json $OUT/eval_$split.json --no-progress > $OUT/eval_$split.txt 2>&1
done
cp $OUT/eval_val.json benchmarks/accuracy_cellpose_v12budget_val.json
echo done
