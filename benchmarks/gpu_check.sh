#!/usr/bin/env bash
# The GPU check, for a machine with CUDA and its own PyTorch, and no network: runs the
# project from source, the CUDA correctness tests, Figure 2(b) and the peer benchmark on
# the GPU, and a short omniglot-5w1s training run; about 8 minutes in all. Results go to
# $OUT (default docs/benchmarks/gpu). Usage: IMAML_DATA_DIR=... bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-docs/benchmarks/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"
timeout 120 $PY -m pytest -q tests/test_cuda.py tests/test_linalg.py tests/test_implicit.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
(cd benchmarks && timeout 150 $PY fig2b_cost.py --device cuda --meta-batch 32 --time-cap 5 --repeats 3)
cp docs/benchmarks/fig2b_cost.* "$OUT/" 2>/dev/null
timeout 200 $PY -m imaml train --preset omniglot-5w1s --device cuda --time-budget 2.5 --val-every 500 \
  --val-tasks 200 --out "$OUT/run" --quiet --no-test
timeout 60 $PY -m imaml eval "$OUT/run" --tasks 600 --json > "$OUT/eval-600.json"
rm -f "$OUT/run/"*.pt
echo "gpu check done"
