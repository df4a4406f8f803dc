#!/usr/bin/env bash
# The CPU training comparison in the README: omniglot-5w1s, iMAML then MAML then FOMAML,
# one after the other (never in parallel on 2 cores), each for the same wall-clock budget,
# then 600 test tasks each. Usage: scripts/cpu_baselines.sh [MINUTES] [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
MIN=${1:-20}
RUNS=${2:-runs/cpu-baselines}
for algo in imaml maml fomaml; do
  .venv/bin/imaml train --preset omniglot-5w1s --algo "$algo" --out "$RUNS/$algo" \
    --time-budget "$MIN" --val-every 100 --val-tasks 200 --threads 2 --quiet --no-test
  .venv/bin/imaml eval "$RUNS/$algo" --tasks 600 --json > "$RUNS/$algo/eval-600.json"
done
