#!/usr/bin/env bash
# GPU benchmark of network training (issue #5): epoch time of nclab's loop (device-resident
# data, bf16 autocast, channels_last) against a DataLoader/float32 reference on MNIST-shaped
# data (60000 x 1 x 32 x 32, ResNet18 width 1), and metric-pass time / epoch time.
# Targets: speedup >= 2.5, metric_pass_over_epoch <= 0.15.  Usage: benchmarks/gpu_train.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/out}}"
mkdir -p "$OUT"
PYTHONPATH=src python benchmarks/train.py --device cuda --n 60000 --width 1 --epochs 2 \
  | tee "$OUT/gpu_train.txt"
tail -n 1 "$OUT/gpu_train.txt" > "$OUT/gpu_train.json"
