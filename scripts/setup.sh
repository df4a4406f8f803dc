#!/usr/bin/env bash
# Create .venv/ at the repo root and install imaml into it (editable), with test tools.
# Torch is constrained by constraints.txt (the CPU wheel this project's machines carry);
# set IMAML_TORCH_SPEC="" to let pip choose your platform's usual torch build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
constraint=()
if [ "${IMAML_TORCH_SPEC-constraints.txt}" = "constraints.txt" ]; then
  constraint=(-c constraints.txt)
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "${constraint[@]}" -e ".[test]"
.venv/bin/python -c "import imaml, torch; print(f'imaml {imaml.__version__} with torch {torch.__version__} ready in .venv/')"
