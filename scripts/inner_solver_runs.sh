#!/usr/bin/env bash
# Inner-solver comparison: omniglot-5w1s iMAML with the GD inner loop vs the Newton-CG
# ("Hessian-free") inner loop, equal wall-clock budget each, one after the other.
# Usage: scripts/inner_solver_runs.sh [MINUTES] [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MIN=${1:-8}
RUNS=${2:-runs/inner-solvers}
.venv/bin/imaml train --preset omniglot-5w1s --out "$RUNS/gd" --time-budget "$MIN" \
  --val-every 50 --val-tasks 200 --threads 2 --quiet --no-test
.venv/bin/imaml train --preset omniglot-5w1s-hf --out "$RUNS/newton_cg" --time-budget "$MIN" \
  --val-every 10 --val-tasks 200 --threads 2 --quiet --no-test
for r in gd newton_cg; do .venv/bin/imaml eval "$RUNS/$r" --tasks 600 --json > "$RUNS/$r/eval-600.json"; done
(cd benchmarks && ../.venv/bin/python compare_runs.py gd_vs_newton_cg "../$RUNS/gd" "../$RUNS/newton_cg")
