"""``imaml train`` with the CUDA pieces' defaults set to a compiled variant's settings.

benchmarks/gpu_check.sh's ``race`` stage times compiled variants of the meta-step
(``gpu_step.py --compile-variant``) and writes the fastest to a JSON file (``mode``:
``pieces`` or ``pieces-solve``, ``conv``, ``inductor_options``). This runs ``imaml train``
as it would run if those were the defaults: ``imaml.fast.SOLVE_PIECE["cuda"]`` and
``CUDA_PIECES_OPTIONS`` are set from the file, and the network's convolutions are
computed as the winner's (``conv_variants.set_conv_impl`` on every Omniglot network built).
A convolution choice ending in ``-tf32`` (gpu_step.py's) also turns on TF32 matrix
products (``torch.backends.cuda.matmul.allow_tf32``), as the benchmark did. The run's
summary records what it used (``compile.solve_piece``, ``compile.options``; the
convolutions are printed).

    python benchmarks/train_as_winner.py WINNER.json train --preset omniglot-5w1s ...
"""

from __future__ import annotations

import json
import sys

import imaml.fast as cg
import imaml.models as models
from imaml.cli import main

from conv_variants import set_conv_impl

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
    build = models.OmniglotConvNet.__init__

    def with_winners_convolutions(self, *args, **kwargs):
        build(self, *args, **kwargs)
        set_conv_impl(self, conv.removesuffix("-tf32"))

    models.OmniglotConvNet.__init__ = with_winners_convolutions
    print(f"training as {winner['variant']} with {conv} convolutions", flush=True)
    sys.exit(main(sys.argv[2:]))
