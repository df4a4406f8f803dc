#!/usr/bin/env bash
# The GPU check, for a machine with CUDA and its own PyTorch, and no network. Runs the
# project from source: the CUDA correctness tests (graph replay = eager, CUDA = CPU in
# float64), milliseconds per meta-step (per-task loop, eager vmap, CUDA graph;
# benchmarks/gpu_step.py; with COMPILE_S=N > 0 also the torch.compile variants of
# COMPILE_MODES (default "pieces"; "pieces step" adds the whole-step compile, which took
# more than 400 s on an H200 on 2026-11-27) within N seconds, gpu_step_compiled.json),
# Figure 2(b) on the GPU, and an
# omniglot-5w1s training run (the paper's schedule of up to 20,000 meta-steps, stopped by
# a time budget) with a 600-task test evaluation. Since 2026-11-27 that run compiles the
# pieces by default (imaml train's --compile auto on CUDA; ~45-85 s of the budget);
# TRAIN_ARGS="--compile off" trains with the eager graph as the earlier loans did. Without the compile stage: 400 s on an
# H100 with 220 s of training (2026-11-26). Every stage has its own time limit, so one
# failing stage does not cost the others. Results go to $OUT (default
# docs/benchmarks/gpu): log.txt, gpu_step.json, fig2b_cost_cuda.{json,png}, eval-600.json,
# eval-600-lam0.json,
# run.tar.gz (config, metrics.jsonl, learning curve; no checkpoints).
#
#   IMAML_DATA_DIR=/path/holding/omniglot bash benchmarks/gpu_check.sh [TRAIN_SECONDS]
#
# STAGES picks stages (default all: "device tests step profile compile fig2b train"; compile runs
# only with COMPILE_S > 0; "loop" (benchmarks/train_overhead.py, LOOP_ARGS, LOOP_S) runs only
# when named), e.g. the speed check alone (150 s on an H200, 2026-11-27):
#   STAGES="device tests step profile" STEP_ARGS="--repeats 10 --loop-repeats 0" \
#   bash benchmarks/gpu_check.sh
# or the compiled pieces and a training run that uses them (TRAIN_ARGS go to imaml train;
# 354 s on an H200 on 2026-11-27: tests 54 s, compile stage 93 s, training 150 s):
#   STAGES="device tests compile train" COMPILE_S=300 TRAIN_ARGS="--compile pieces" \
#   bash benchmarks/gpu_check.sh 150
# or, NEXT: the paper's whole 20,000-step schedule with the defaults (on CUDA: compiled
# product pieces, forward-over-reverse products, the one-behind loop; 15.9 ms per training
# step on an H200 on 2026-11-27, so ~6 minutes plus ~80 s of compilation) and its 600-task
# test evaluation, in one call of the device tool (10 minutes at most):
#   STAGES="device train" bash benchmarks/gpu_check.sh 500
# or, also NEXT: whether the solve piece compiles on CUDA with either of two inductor
# options. Triton failed on its fused MINRES kernel (a persistent reduction,
# "triton_per_fused_..._linalg_vector_norm_...": "PassManager::run failed" in make_ttgir),
# as it has failed on inductor's mix-order reductions elsewhere; turning off either may
# avoid that kernel. The product pieces' 15.7 ms (fwd) is the figure to beat:
#   STAGES="device compile" COMPILE_S=540 COMPILE_MODES=pieces-solve STEP_ARGS="--repeats \
#   20 --compile-hvp fwd --compile-inductor triton.mix_order_reduction=False \
#   triton.persistent_reductions=False" bash benchmarks/gpu_check.sh
# Run on an H200 on 2026-11-27 (the fourth loan; solve_check_log_h200.txt): the solver as
# one compiled piece (the CPU's default) with forward-over-reverse products, a training
# run with the defaults of the time, then channels-last convolutions with the product
# pieces. Triton failed to compile the solve piece (the CUDA default is since the product
# piece), the training run fell back to the uncompiled graph, and channels-last was slower
# (19.4 against 15.7 ms):
#   S=$(date +%s); STAGES="device tests compile train" COMPILE_S=260 \
#   COMPILE_MODES="pieces-solve pieces" STEP_ARGS="--repeats 20 --compile-hvp fwd" \
#   TRAIN_ARGS="--hvp-mode fwd" bash benchmarks/gpu_check.sh 110; STAGES=compile \
#   COMPILE_S=$((585 - $(date +%s) + S)) OUT=${OUT:-docs/benchmarks/gpu}/cl \
#   STEP_ARGS="--repeats 20 --compile-hvp fwd --compile-layout channels-last" \
#   bash benchmarks/gpu_check.sh
# or what the training loop adds to the compiled pieces, reading each step in order and
# one step behind (the CUDA default; not yet run on a GPU as its own benchmark: a training
# run took 15.9 ms per step against a 15.7 ms meta-step on 2026-11-27):
#   STAGES="device loop" LOOP_S=240 LOOP_ARGS="--compile pieces --hvp-mode fwd" \
#   bash benchmarks/gpu_check.sh
# or where the compiled pieces' time goes (PROFILE_ARGS go to gpu_profile.py; the pieces
# compiled in 70-84 s on an H200), with a longer training run that uses them:
#   STAGES="device profile train" PROFILE_S=200 PROFILE_ARGS="--compile pieces --hvp-mode fwd" \
#   TRAIN_ARGS="--compile pieces --hvp-mode fwd" bash benchmarks/gpu_check.sh 300
#
# To try the script without a GPU (small sizes, CPU; CUDA tests skip):
#   DEVICE=cpu STEP_ARGS="--repeats 1 --tasks 4 --channels 8" FIG2B_ARGS="--meta-batch 1 \
#   --time-cap 0.01" OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh 20
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-docs/benchmarks/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=$(command -v "${PYTHON:-python3}")
TRAIN_S=${1:-240}
COMPILE_S=${COMPILE_S:-0}
COMPILE_MODES=${COMPILE_MODES:-pieces}
TRAIN_ARGS=${TRAIN_ARGS:-}
PROFILE_ARGS=${PROFILE_ARGS:---conv fastest}
PROFILE_S=${PROFILE_S:-90}
LOOP_ARGS=${LOOP_ARGS:-}
LOOP_S=${LOOP_S:-240}
DEVICE=${DEVICE:-cuda}
STEP_ARGS=${STEP_ARGS:---repeats 20}
FIG2B_ARGS=${FIG2B_ARGS:---meta-batch 32 --time-cap 5 --repeats 2}
STAGES=${STAGES:-device tests step profile compile fig2b train}
exec > >(tee "$OUT/log.txt") 2>&1
stage() { echo; echo "== $1 ($SECONDS s)"; }
on() { [[ " $STAGES " == *" $1 "* ]]; }

if on device; then
stage "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
fi

if on tests; then
stage "CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_graph.py 2>&1 | tail -15
fi

if on step; then
stage "ms per meta-step"
(cd benchmarks && timeout 200 $PY gpu_step.py $STEP_ARGS --out "$OUT")
fi

if on profile; then
stage "profile of the step without a graph: $PROFILE_ARGS"
(cd benchmarks && timeout "$PROFILE_S" $PY gpu_profile.py --repeats 10 $PROFILE_ARGS --out "$OUT" | head -30)
fi

if on compile && [ "$COMPILE_S" -gt 0 ]; then
  stage "torch.compile of the meta-step (compiled, and compiled inside the CUDA graph)"
  (cd benchmarks && timeout "$COMPILE_S" $PY gpu_step.py $STEP_ARGS --compile $COMPILE_MODES --out "$OUT")
fi

if on loop; then
  stage "the training loop's cost beyond the meta-step: $LOOP_ARGS"
  (cd benchmarks && timeout "$LOOP_S" $PY train_overhead.py --device "$DEVICE" $LOOP_ARGS --out "$OUT")
fi

if on fig2b; then
stage "Figure 2(b) on the GPU"
(cd benchmarks && timeout 100 $PY fig2b_cost.py --device "$DEVICE" $FIG2B_ARGS --out "$OUT")
fi

if on train; then
stage "training omniglot-5w1s for up to ${TRAIN_S} s ${TRAIN_ARGS}"
RUN=/tmp/imaml-gpu-run
rm -rf "$RUN"
budget=$(python3 -c "print($TRAIN_S / 60)")
timeout $((TRAIN_S + 90)) $PY -m imaml train --preset omniglot-5w1s --device "$DEVICE" \
  --time-budget "$budget" --val-every 1000 --val-tasks 200 --out "$RUN" --quiet --no-test \
  $TRAIN_ARGS
tail -n 3 "$RUN/metrics.jsonl" | cut -c1-400

stage "test evaluation (600 tasks)"
timeout 60 $PY -m imaml eval "$RUN" --tasks 600 --json --quiet > "$OUT/eval-600.json"
cat "$OUT/eval-600.json"
echo "with λ = 0 at evaluation (the authors' protocol):"
timeout 60 $PY -m imaml eval "$RUN" --tasks 600 --eval-lam 0 --json --quiet > "$OUT/eval-600-lam0.json"
cat "$OUT/eval-600-lam0.json"
tar -czf "$OUT/run.tar.gz" -C "$RUN" --exclude '*.pt' .
fi

stage "gpu check done"
