"""Where the time of one iMAML meta-step goes: torch.profiler's top operators.

omniglot-5w1s network, meta-batch 32, 16 inner GD steps, 5 MINRES steps, CPU.
Writes docs/benchmarks/profile_cpu.txt.

    python benchmarks/profile_step.py [--rows 25]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from imaml import TaskBatch, make_algorithm
from imaml.models import OmniglotConvNet

from common import OUT


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    x = lambda: torch.rand(32, 5, 1, 28, 28, generator=g)
    y = torch.arange(5).repeat(32, 1)
    batch = TaskBatch(x(), y, x(), y)
    alg = make_algorithm("imaml", model=model, lam=2.0, inner_steps=16, inner_lr=0.1, cg_steps=5)
    params = dict(model.named_parameters())
    alg.meta_grad(params, batch)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        alg.meta_grad(params, batch)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    OUT.mkdir(parents=True, exist_ok=True)
    header = (
        f"# One iMAML meta-step, omniglot-5w1s network, meta-batch 32, 16 inner steps, 5 MINRES steps\n"
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads; python benchmarks/profile_step.py\n"
    )
    (OUT / "profile_cpu.txt").write_text(header + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
