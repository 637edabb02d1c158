#!/bin/bash
# After scripts/train_cellpose_baseline.py ... --name cellpose_v12budget: evaluate it on val and test
# (data prepared as it was trained: `prepared`, luminance), as the earlier Cellpose baselines were.
set -u
# run from a worktree of main at the commit that added this script (/work/wt_eval, `prepared` and `runs`
# linked to main's), so that main's package can change while it waits
cd /work/wt_eval
M=runs/cellpose_v12budget/models/cellpose_v12budget
OUT=benchmarks/training/cellpose_v12budget
cp runs/cellpose_v12budget/cellpose_v12budget.json $OUT/record.json
for split in val test; do
  PYTHONPATH=/tmp/cp3 OMP_NUM_THREADS=2 /work/main/.venv/bin/python /tmp/wt_run.py /work/wt_eval /tmp/cli.py evaluate --data prepared --split $split --model none \
    --baseline cellpose_v12budget=cellpose:$M --json $OUT/eval_$split.json --no-progress > $OUT/eval_$split.txt 2>&1
done
mkdir -p /work/main/$OUT && cp $OUT/* /work/main/$OUT/
cp $OUT/eval_val.json /work/main/benchmarks/accuracy_cellpose_v12budget_val.json
echo done
