#!/usr/bin/env bash
# One GPU allocation for the Omniglot table (benchmarks/table2.py), from a bare machine
# with PyTorch and CUDA but none of our packages: the project runs from source. Copy the
# data into the working tree first (runs/ is ignored by git) and carry it:
#
#   here:    mkdir -p runs/data/omniglot && cp ../shared/data/omniglot/*.zip runs/data/omniglot/
#   device:  run(command="bash benchmarks/table2_device.sh 7 4", carry=["runs/data"], timeout_s=780)
#            (about 1 + 3 + 7 + 2 minutes: start, throughput, training, timing)
#   here:    python benchmarks/table2.py unpack /work/.device/.../table2-*.tar.gz && \
#            python benchmarks/table2.py status      # then commit results/table2 and docs/results
#
# Arguments: MINUTES of training (default 7), PARALLEL cells at once (default 4), then
# any further arguments for 'table2.py run' (e.g. --cells ...).
# First measures what advancing PARALLEL cells at once gains over one alone
# (THROUGHPUT_S seconds of training each way, default 45; 0 skips it) into
# $OUT/table2_throughput.json; then trains; then times the cells on this GPU with what is
# left of the allocation (TIME_S, default 120 s), into $OUT/table2_gpu_times.json.
set -uo pipefail
cd "$(dirname "$0")/.."
MIN=${1:-7}
PAR=${2:-4}
shift 2 2>/dev/null || shift $#
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export IMAML_DATA_DIR=${IMAML_DATA_DIR:-$PWD/runs/data} OUT=${OUT:-/tmp/table2-out}
export TABLE2_RESULTS=$OUT
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | tee "$OUT/device.txt"
if [ "${THROUGHPUT_S:-45}" != 0 ]; then
  timeout 300 python benchmarks/table2.py throughput --device cuda --parallel "$PAR" \
    --seconds "${THROUGHPUT_S:-45}" 2>&1 | tee "$OUT/table2_log.txt"
fi
python benchmarks/table2.py run --minutes "$MIN" --out "$OUT" --parallel "$PAR" --device cuda "$@" \
  2>&1 | tee -a "$OUT/table2_log.txt"
timeout "${TIME_S:-120}" python benchmarks/table2.py time --device cuda --steps 30 \
  2>&1 | tee -a "$OUT/table2_log.txt"
ls -la "$OUT"
