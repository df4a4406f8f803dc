#!/usr/bin/env bash
# Set up .venv/ (scripts/setup.sh) and run the lint and the test suite.
# Tests that need the real Omniglot release run when IMAML_DATA_DIR holds omniglot/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check src tests benchmarks
# two workers (pytest-xdist), one thread each (tests/conftest.py); IMAML_TEST_WORKERS=0: one process
.venv/bin/python -m pytest -q -n "${IMAML_TEST_WORKERS:-2}" "$@"
