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
# docs/results/gpu): log.txt, gpu_step.json, fig2b_cost_cuda.{json,png}, eval-600.json,
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
# or the race (stage race; RACE lists compiled variants as gpu_step.py --compile-variant
# MODE:CONV[:OPTIONS]): phase 1 compiles them all at once, each in its own process, beside
# the CUDA tests (RACE_TESTS=0: without them); phase 2 times those that compiled, one after
# another in one process from inductor's cache; the fastest goes to $WINNER
# (/tmp/imaml-race-winner.json) and $OUT/winner.json. Its default six: the product pieces
# with native convolutions, --conv slices and slices-first; the solve piece with native
# convolutions and inductor's persistent or mix-order reductions off, and with slices and
# both off. Run on an H200 on 2026-11-27 (the fifth loan; 240 s; race1_*_h200):
#   STAGES="device race" bash benchmarks/gpu_check.sh
# then, at once on the same machine (its inductor cache warm), the variants a fix had let
# through and 248 s of training as the fastest (train_as_winner.py; race2_*_h200,
# run_h200_solve_*; 522 s in all):
#   S=$(date +%s); RACE="pieces:slices pieces-solve:slices:triton.persistent_reductions=False \
#   pieces:slices-first pieces-solve:native:triton.persistent_reductions=False" \
#   RACE_COMPILE_S=150 RACE_TIME_S=90 RACE_TESTS=0 STAGES=race bash benchmarks/gpu_check.sh; \
#   E=$(( $(date +%s) - S )); IMAML_DATA_DIR=$PWD/runs/data STAGES=train \
#   WINNER=/tmp/imaml-race-winner.json bash benchmarks/gpu_check.sh $(( 470 - E ))
# The solve piece with persistent reductions off won (15.2-15.3 against 15.6 ms; now the
# CUDA default); slices were slower (20.0 and 18.4 ms).
# NEXT: slices with TF32 matrix products (as cuDNN's convolutions use), the CUDA tests
# (the slices fix), and the whole 20,000-step schedule with the defaults:
#   S=$(date +%s); RACE="pieces-solve:native pieces-solve:slices-tf32 pieces:slices-tf32 \
#   pieces-solve:slices-first-tf32" RACE_COMPILE_S=200 RACE_TIME_S=90 \
#   STAGES="device race" bash benchmarks/gpu_check.sh
#   STAGES="device train" bash benchmarks/gpu_check.sh 420
# Run on an H200 on 2026-11-27 (the fourth loan; solve_check_log_h200.txt): the solver as
# one compiled piece (the CPU's default) with forward-over-reverse products, a training
# run with the defaults of the time, then channels-last convolutions with the product
# pieces. Triton failed to compile the solve piece (the CUDA default is since the product
# piece), the training run fell back to the uncompiled graph, and channels-last was slower
# (19.4 against 15.7 ms):
#   S=$(date +%s); STAGES="device tests compile train" COMPILE_S=260 \
#   COMPILE_MODES="pieces-solve pieces" STEP_ARGS="--repeats 20 --compile-hvp fwd" \
#   TRAIN_ARGS="--hvp-mode fwd" bash benchmarks/gpu_check.sh 110; STAGES=compile \
#   COMPILE_S=$((585 - $(date +%s) + S)) OUT=${OUT:-docs/results/gpu}/cl \
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
OUT=${OUT:-docs/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=$(command -v "${PYTHON:-python3}")
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute: stages cd into benchmarks
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
RACE=${RACE:-pieces:native pieces:slices pieces:slices-first \
pieces-solve:native:triton.persistent_reductions=False \
pieces-solve:native:triton.mix_order_reduction=False \
pieces-solve:slices:triton.persistent_reductions=False,triton.mix_order_reduction=False}
RACE_COMPILE_S=${RACE_COMPILE_S:-240}
RACE_TIME_S=${RACE_TIME_S:-150}
RACE_TESTS=${RACE_TESTS:-1}
RACE_ARGS=${RACE_ARGS:-}  # more gpu_step.py arguments for both phases (--tasks 4 on a CPU)
WINNER=${WINNER:-}  # a race winner's JSON: the train stage trains as it (train_as_winner.py)
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

if on race; then
  # phase 1: every variant of RACE compiles in its own process, all at once (the CPU work;
  # this phase's timings are not used), with the CUDA tests beside them; phase 2: the
  # variants that compiled, timed one after another in one process from inductor's cache;
  # the fastest graph row goes to $WINNER (read by the train stage) and $OUT/winner.json
  stage "race, phase 1: $RACE"
  WINNER=${WINNER:-/tmp/imaml-race-winner.json}
  rm -f "$WINNER"
  R=$OUT/race
  mkdir -p "$R/warm"
  read -r -a variants <<< "$RACE"
  pids=()
  for v in "${variants[@]}"; do
    n=$(echo "$v" | tr ':=,.' '____')
    (cd benchmarks && timeout "$RACE_COMPILE_S" $PY gpu_step.py $RACE_ARGS --repeats 2 \
      --graph-only --no-reference --compile-hvp fwd --compile-variant "$v" --out "$R/warm/$n" \
      > "$R/warm/$n.log" 2>&1) &
    pids+=($!)
  done
  if [ "$RACE_TESTS" = 1 ]; then
    timeout "$RACE_COMPILE_S" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
      tests/test_cuda_graph.py > "$R/tests.log" 2>&1 &
    pids+=($!)
  fi
  wait "${pids[@]}"  # not a bare wait: that would wait for the log's tee too
  [ "$RACE_TESTS" = 1 ] && tail -5 "$R/tests.log"
  ok=()
  for v in "${variants[@]}"; do
    n=$(echo "$v" | tr ':=,.' '____')
    if $PY - "$R/warm/$n/gpu_step_compiled.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
sys.exit(0 if any("ms" in r and r["variant"].startswith("graph-compiled") for r in rows) else 1)
PY
    then ok+=("$v"); echo "compiled: $v"
    else echo "FAILED: $v"; grep -h -m3 -E "Error|error" "$R/warm/$n.log" | cut -c1-300
    fi
  done
  stage "race, phase 2: ${ok[*]}"
  if [ ${#ok[@]} -gt 0 ]; then
    (cd benchmarks && timeout "$RACE_TIME_S" $PY gpu_step.py $RACE_ARGS --repeats 30 \
      --compile-hvp fwd \
      --compile-variant "${ok[@]}" --out "$R")
    $PY - "$R/gpu_step_compiled.json" "$WINNER" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if "ms" in r]
rows = [r for r in rows if r["variant"].startswith("graph-compiled")]
best = min(rows, key=lambda r: r["ms"])
json.dump(best, open(sys.argv[2], "w"), indent=1)
print(f"fastest: {best['variant']} with {best['conv']} convolutions, {best['ms']:.2f} ms")
PY
    cp "$WINNER" "$OUT/winner.json"
    cp "$R/gpu_step_compiled.json" "$OUT/race_step.json"
  fi
  tar -czf "$OUT/race.tar.gz" -C "$R" . && rm -rf "$R"
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
TRAIN=(-m imaml)
if [ -n "$WINNER" ] && [ -f "$WINNER" ]; then  # the race's fastest, as if the defaults
  TRAIN=(benchmarks/train_as_winner.py "$WINNER")
fi
timeout $((TRAIN_S + 90)) $PY "${TRAIN[@]}" train --preset omniglot-5w1s --device "$DEVICE" \
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
