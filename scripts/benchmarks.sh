#!/usr/bin/env bash
# Every CPU benchmark, one after the other (never two at once on 2 cores), then the
# README's training comparisons. Results land in docs/results/.
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
$PY cpu_variants.py
$PY cpu_variants.py --solver minres
$PY cpu_variants.py --repeats 5 --name cpu_pieces_tried \
    --variants pieces-cold pieces-channels-last pieces-hvp-fwd pieces-unfold-first pieces-solve
$PY cpu_variants.py --repeats 5 --name cpu_threads_tried \
    --variants eager threads pieces-cold pieces-threads
$PY cpu_variants.py --repeats 7 --malloc keep --name cpu_pieces_chunks \
    --variants pieces-cold pieces-chunk4 pieces-chunk8 pieces-chunk16
$PY peers.py --impls ours-pieces-cg,ours-pieceschunk8-cg --mallocs keep,system --repeats 5 \
    --name peers_pieces_chunk8
$PY cpu_variants.py --repeats 7 --malloc keep --name cpu_pieces_layout \
    --variants pieces-cold pieces-channels-last
$PY cpu_variants.py --repeats 9 --malloc keep --queries 1 --name cpu_pieces_layout_q1 \
    --variants pieces-cold pieces-channels-last
# pieces-cold is the default of the day; the product piece is pieces-matvec since the
# solve piece became the CPU's default (the recorded cpu_pieces_solve* name it pieces-cold)
$PY cpu_variants.py --repeats 5 --malloc keep --name cpu_pieces_solve \
    --variants pieces-matvec pieces-solve
$PY cpu_variants.py --repeats 7 --malloc keep --queries 1 --name cpu_pieces_solve_q1 \
    --variants pieces-matvec pieces-solve
$PY peers.py --impls ours-pieces-cg,ours-loop-cg,torchopt-cg,torchopt-example \
    --mallocs system,keep --repeats 5 --name peers_pieces_solve
$PY query_per_task.py --processes 3
$PY cpu_variants.py --repeats 7 --malloc keep --name cpu_pieces_query \
    --variants pieces-solve pieces-query-vmap
for name in peers_pieces_query peers_pieces_query_2; do  # twice: the run-to-run spread
    $PY peers.py --impls ours-pieces-cg,ours-loop-cg,torchopt-cg,torchopt-example \
        --mallocs system,keep --repeats 5 --name "$name"
done
$PY distributed_throughput.py
$PY float32_sensitivity.py
$PY train_overhead.py
$PY fig2b_cost.py
$PY fig2a_accuracy.py
