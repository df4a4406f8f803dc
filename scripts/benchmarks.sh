#!/usr/bin/env bash
# Every CPU benchmark, one after the other (never two at once on 2 cores), then the
# README's training comparisons. Results land in docs/benchmarks/.
set -euo pipefail
cd "$(dirname "$0")/../benchmarks"
PY=../.venv/bin/python
$PY vmap_vs_loop.py
$PY hvp_modes.py
$PY solver_accuracy.py --data omniglot
$PY solver_accuracy.py --data random
$PY profile_step.py
$PY profile_step.py --compile
$PY inner_solvers.py
$PY peers.py --repeats 5
$PY peers.py --float64
$PY roofline.py            # reads peers.json
$PY conv_layouts.py
$PY cpu_variants.py
$PY cpu_variants.py --solver minres
$PY float32_sensitivity.py
$PY train_overhead.py
$PY fig2b_cost.py
$PY fig2a_accuracy.py
