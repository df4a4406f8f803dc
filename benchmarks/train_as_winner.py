"""``imaml train`` with the CUDA pieces' defaults set to a compiled variant's settings.

benchmarks/gpu_check.sh's ``race`` stage times compiled variants of the meta-step
(``gpu_step.py --compile-variant``) and writes the fastest to a JSON file (``mode``:
``pieces`` or ``pieces-solve``, ``conv``, ``inductor_options``). This runs ``imaml train``
as it would run if those were the defaults: ``imaml.fast.SOLVE_PIECE["cuda"]`` and
``CUDA_PIECES_OPTIONS`` are set from the file, and ``--conv`` is added to the arguments.
A convolution choice ending in ``-tf32`` (gpu_step.py's) also turns on TF32 matrix
products (``torch.backends.cuda.matmul.allow_tf32``), as the benchmark did. The run's
summary records what it used (``compile.solve_piece``, ``compile.options``, config.json's
``conv``).

    python benchmarks/train_as_winner.py WINNER.json train --preset omniglot-5w1s ...
"""

from __future__ import annotations

import json
import sys

import imaml.fast as cg
from imaml.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    winner = json.loads(open(sys.argv[1]).read())
    cg.SOLVE_PIECE["cuda"] = winner["mode"] == "pieces-solve"
    cg.CUDA_PIECES_OPTIONS.update(winner["inductor_options"])
    conv = winner["conv"]
    if conv.endswith("-tf32"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"training as {winner['variant']} with {conv} convolutions", flush=True)
    sys.exit(main([*sys.argv[2:], "--conv", conv.removesuffix("-tf32")]))
