#!/usr/bin/env bash
# Every GPU check and benchmark in one go (for a lent CUDA machine; CI never runs it).
#   bash benchmarks/gpu_all.sh [OUT_DIR]
# 1. the CUDA tests (tests/test_cuda.py: measure, UFM solve float64/float32, network training);
# 2. UFM gradient descent: the CPU ratios plus >= 8192 batched problems on the GPU
#    (target >= 5e6 problem-iterations/s on an H100);
# 3. metrics on N = 50,000, d = 512, K = 100 (CPU reference vs nclab on the GPU);
# 4. a ResNet18 epoch on MNIST-shaped data vs a DataLoader/float32 loop (target >= 2.5x),
#    and metric pass / epoch (target <= 0.15).
# The machine's image lacks tomli-w: carry its wheel (see the device tool's README) or
# `pip install tomli-w` first. Output goes to OUT_DIR (default $OUT or benchmarks/out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/out}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
run() { echo "=== $*"; "$@" 2>&1 | tee -a "$OUT/gpu_all.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu_all.log"
run python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
run python3 benchmarks/ufm_gd.py --device cuda
run python3 benchmarks/metrics.py --device cuda
run python3 benchmarks/train.py --device cuda --n 60000 --width 1 --epochs 2
exit $status
