#!/usr/bin/env bash
# Fresh end-to-end run of the documented v10 command (2026-12-05), timed per step.
set -euo pipefail
cd /work/train_wt
PY=/work/main/.venv/bin/python
L=/tmp/wt_launch.py
t0=$(date +%s)
step() { local name=$1; shift; local s=$(date +%s); "$@"; local e=$(date +%s); echo "STEP $name $((e-s)) s (since start $((e-t0)) s) $(date -u +%FT%TZ)"; }
step prepare $PY $L /work/train_wt prepare ../shared/data/dsb2018 ../shared/data/deepcell1 ../shared/data/monuseg -o prepared --stats
step prepare_hed $PY $L /work/train_wt prepare ../shared/data/dsb2018 ../shared/data/deepcell1 ../shared/data/monuseg -o prepared_hed --stain-grey hematoxylin
step train $PY $L /work/train_wt train --config configs/cpu_v10.yaml
echo "TOTAL $(( $(date +%s) - t0 )) s"
