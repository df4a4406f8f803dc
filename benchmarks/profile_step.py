"""Where the time of one iMAML meta-step goes: torch.profiler's top operators.

omniglot-5w1s network, meta-batch 32, 16 inner GD steps, 5 MINRES steps, CPU, with freed
memory kept for reuse as ``imaml train`` does (``--malloc system``: glibc's defaults).
``--compile`` profiles the ``torch.compile``d step instead, with inductor's per-kernel
profiling on, so its fused kernels appear by name (the compilation, minutes, is not
profiled). Writes docs/results/profile_cpu.txt (``--compile``: profile_cpu_compiled.txt).

    python benchmarks/profile_step.py [--rows 25] [--compile] [--malloc keep|system]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from imaml import TaskBatch
from imaml.fast import MetaStep
from imaml.models import OmniglotConvNet

from common import OUT, use_malloc
from peers import peer_algorithm


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="profile the compiled step")
    ap.add_argument("--malloc", choices=("keep", "system"), default="keep")
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    use_malloc(args.malloc)
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    g = torch.Generator().manual_seed(0)
    model = OmniglotConvNet(5, generator=g)
    x = lambda: torch.rand(32, 5, 1, 28, 28, generator=g)
    y = torch.arange(5).repeat(32, 1)
    batch = TaskBatch(x(), y, x(), y)
    alg = peer_algorithm(model, solver="minres")
    params = dict(model.named_parameters())
    step = MetaStep(alg, compile=args.compile)
    for _ in range(2):  # warm-up (compiled: compilation, then one step)
        step(params, batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(params, batch)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    OUT.mkdir(parents=True, exist_ok=True)
    header = (
        f"# One iMAML meta-step, omniglot-5w1s network, meta-batch 32, 16 inner steps, 5 MINRES steps\n"
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, malloc {args.malloc}; "
        f"python benchmarks/profile_step.py --malloc {args.malloc}"
        f"{' --compile' if args.compile else ''}\n"
    )
    name = "profile_cpu_compiled.txt" if args.compile else "profile_cpu.txt"
    (OUT / name).write_text(header + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
