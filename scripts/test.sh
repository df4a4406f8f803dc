#!/usr/bin/env bash
# Set up .venv/ (scripts/setup.sh) and run the lint and the test suite.
# Tests that need the real Omniglot release run when IMAML_DATA_DIR holds omniglot/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
