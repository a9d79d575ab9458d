#!/usr/bin/env bash
# make demo: fine-tune the offline-pretrained EfficientNet-Lite0 on the embedded toy dataset, train
# the same architecture from scratch and as a linear probe, and print the comparison.
#   bash scripts/demo.sh            (after `make install`; `make demo` does both)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ACC=${ACC:-.venv/bin/accelerate}
OUT=runs/demo-$(date +%Y%m%d-%H%M%S)
for method in finetune scratch linear_probe; do
  echo "== $method =="
  "$ACC" launch --config_file accelerate_configs/cpu.yaml scripts/train_classifier.py \
    --config "configs/toy_effnetlite0_${method}.yaml" --train.output_dir "$OUT/$method" --train.progress false
done
echo
echo "== test metrics on the toy dataset ($OUT) =="
"$PY" scripts/compare_runs.py "$OUT/finetune" "$OUT/scratch" "$OUT/linear_probe" --output "$OUT/summary.md"
