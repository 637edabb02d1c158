#!/usr/bin/env bash
# The v6 arm (TTFNet's detector targets, #18), 2-core CPU, 2026-12-04: trained, swept and compared with
# the shipped v5 on the same prepared data. Run from the repository root with the venv active.
set -euxo pipefail
export OMP_WAIT_POLICY=PASSIVE
OUT=benchmarks/training/v6
# stages 3-5 from v3's stage-2 model, as v5's were (runs/cpu_v3/stage2 = the v3 weights, git show f90107a:...)
#   cellsam train --config configs/cpu_v6.yaml --skip-done > $OUT/train.log
python scripts/ship_default.py runs/cpu_v6/stage5/model.safetensors --name cellsam_cpu_v6 --version v6 \
    --recipe configs/cpu_v6.yaml --data prepared --sweep-images 16 --boxes 0.2 0.3 0.4 0.5 --ious 0.0 0.3 \
    --tile-sizes 256 --single-mask --local-decoding --box-threshold-rel 0.5 --out runs/ship_v6 > $OUT/ship.log 2>&1
V6=runs/ship_v6/cellsam_cpu_v6.safetensors
V5=/tmp/cellsam_cpu_v5.safetensors  # git show cb77bca:cellsam/pretrained/cellsam_cpu_v5.safetensors (and .json)
# (the evaluations below ran while v5 was still the bundled default)
for split in val test; do
  cellsam evaluate --data prepared --split $split --model default --json $OUT/eval_v5_$split.json --no-progress > $OUT/eval_v5_$split.txt
  cellsam evaluate --data prepared --split $split --model $V6 --json $OUT/eval_v6_$split.json --no-progress > $OUT/eval_v6_$split.txt
done
python scripts/box_recall.py $V5 $V6 --box-threshold 0.3 --json $OUT/box_recall.json > $OUT/box_recall.txt
for m in $V5 $V6; do
  python scripts/miss_study.py $m --scale true --json $OUT/miss_$(basename $m .safetensors).json > $OUT/miss_$(basename $m .safetensors).txt
done
python scripts/click_study.py $V5 $V6 --diameter segment --json $OUT/clicks.json > $OUT/clicks.txt
# v6 shipped as default (cellsam/pretrained/cellsam_cpu_v6.*): accuracy report and speed, v5 beside it
cellsam evaluate --data prepared --split val --model default --prompt-study --json benchmarks/accuracy_val.json \
    --plots benchmarks/accuracy_plots --worst 6 --no-progress
cellsam benchmark --merge benchmarks/accuracy_val.json benchmarks/accuracy_baselines_val.json \
    benchmarks/accuracy_cellpose_more_val.json benchmarks/accuracy_cellpose_v2budget_val.json \
    benchmarks/accuracy_cellpose_v5budget_val.json --out benchmarks/accuracy.md \
    --title "Accuracy on the validation split (prepared/val: 72 full images, 4,331 cells)" --notes benchmarks/accuracy_notes.md
cellsam bench --model default --sizes 512 --cells 100 --real dense512 mosaic2048 --real-data ../shared/data/dsb2018 \
    --cellpose --cellpose-path /tmp/cp3 --repeats 2 --warmup 1 --no-parity --diameter none auto --out benchmarks/cpu_v6_real
cellsam bench --model default $V5 --sizes 512 --cells 100 --real dense512 mosaic2048 --real-data ../shared/data/dsb2018 \
    --cellpose --cellpose-path /tmp/cp3 --repeats 2 --warmup 1 --no-parity --diameter none auto --out benchmarks/cpu_v6_vs_v5_real
# speed.md: is a smaller working cell diameter a speed lever? v6's weights saved with cell_diameter 20 (not 27.71)
python - <<'PY'
import dataclasses, json
from cellsam.weights import load_model, save_model
m = load_model("default")
m.cfg = m.cfg.replace(inference=dataclasses.replace(m.cfg.inference, cell_diameter=20.0))
meta = json.load(open("cellsam/pretrained/cellsam_cpu_v6.json"))
save_model(m, "/tmp/v6/v6_d20.safetensors", version="v6",
           metadata={k: meta[k] for k in ("training_data", "license", "description")})
PY
cellsam evaluate --data prepared --split val --model /tmp/v6/v6_d20.safetensors --json /tmp/v6/eval_d20_val.json --no-progress
