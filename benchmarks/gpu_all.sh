#!/usr/bin/env bash
# Every GPU check and benchmark in one go (for a lent CUDA machine; CI never runs it).
#   bash benchmarks/gpu_all.sh [OUT_DIR]
# 1. the CUDA tests (tests/test_cuda.py: measure, UFM solve float64/float32, network training);
# 2. UFM gradient descent: the CPU ratios plus >= 8192 batched problems on the GPU
#    (target >= 5e6 problem-iterations/s on an H100);
# 3. metrics on N = 50,000, d = 512, K = 100 (CPU reference vs nclab on the GPU);
# 4. a ResNet18 epoch on MNIST-shaped data vs a DataLoader/float32 loop (target >= 2.5x),
#    and metric pass / epoch (target <= 0.15); its images_per_s is the figure behind
#    `nclab reproduce --full`'s GPU estimate (nclab.nets.experiment.GPU_IMAGES_PER_S);
# 5. the same with torch.compile (TrainSettings.compile).
# After each step one JSON line: {"step", "rc", "seconds", "result"}, where result is the
# step's own last JSON line, pytest's counts, or its last output lines.
# The machine's image lacks tomli-w: carry its wheel (see the device tool's README) or
# `pip install tomli-w` first. Output goes to OUT_DIR (default $OUT or benchmarks/out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/out}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run it (output to OUT/NAME.log and gpu_all.log), then one JSON line
  local name=$1 t0=$SECONDS rc
  shift
  echo "=== $name: $*" | tee -a "$OUT/gpu_all.log"
  "$@" > >(tee "$OUT/$name.log" | tee -a "$OUT/gpu_all.log") 2>&1
  rc=$?
  wait
  [ "$rc" -eq 0 ] || status=1
  python3 - "$name" "$rc" "$((SECONDS - t0))" "$OUT/$name.log" <<'PY' | tee -a "$OUT/gpu_all.log"
import json, re, sys

name, rc, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lines = [line.strip() for line in open(log, errors="replace") if line.strip()]
result = None
for line in reversed(lines):  # the step's own JSON line, if it printed one
    if line.startswith("{"):
        try:
            result = json.loads(line)
            break
        except ValueError:
            pass
if result is None and lines:  # pytest's summary line: counts
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", lines[-1])
    result = {kind: int(n) for n, kind in counts} or lines[-5:]
print(json.dumps({"step": name, "rc": rc, "seconds": int(seconds), "result": result}))
PY
}

nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu_all.log"
step cuda_tests python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step ufm_gd python3 benchmarks/ufm_gd.py --device cuda
step metrics python3 benchmarks/metrics.py --device cuda
step train python3 benchmarks/train.py --device cuda --n 60000 --width 1 --epochs 2
step train_compile python3 benchmarks/train.py --device cuda --n 60000 --width 1 --epochs 2 --compile
exit $status
