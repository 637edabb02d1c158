#!/bin/sh
# The detector-only studies for v10 beside v6, each model on data prepared by its own colour rule
# (benchmarks/detector_study.md explains the scores and the miss classes). 2-core CPU, a few minutes.
OUT=benchmarks/training/v10/detector
V6=runs/ship_v6/cellsam_cpu_v6.safetensors
V10=cellsam/pretrained/cellsam_cpu_v10.safetensors
python scripts/box_recall.py $V6 --data prepared --box-threshold 0.3 --json $OUT/box_recall_v6.json > $OUT/box_recall_v6.txt
python scripts/box_recall.py $V10 --data prepared_hed --box-threshold 0.3 --json $OUT/box_recall_v10.json > $OUT/box_recall_v10.txt
python scripts/miss_study.py $V6 --scale true --data prepared --json $OUT/miss_v6.json > $OUT/miss_v6.txt
python scripts/miss_study.py $V10 --scale true --data prepared_hed --json $OUT/miss_v10.json > $OUT/miss_v10.txt
