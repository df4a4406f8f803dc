"""Meta-steps per second with 1 and 2 processes (torchrun, gloo) on this machine.

omniglot-5w1s iMAML, meta-batch 32, ``--steps`` meta-steps per configuration, no
validation; the figure is 1 / the median step time (rank 0's, which includes the
all-reduce), the first two steps left out (the first is the compilation under
``--compile pieces``, reported apart as ``first_step_s``). 1 process uses 2 threads; 2
processes use 1 thread each (never more threads than cores). Each configuration runs
uncompiled and with compiled pieces (``--compiles``), each from an empty inductor cache.
Writes docs/results/distributed_throughput.json.

    python benchmarks/distributed_throughput.py [--steps 20] [--compiles off,pieces]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from imaml.fast import COMPILE

from common import write

ROOT = Path(__file__).resolve().parents[1]


def measure(procs: int, threads: int, steps: int, compile: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "-m",
            "imaml",
            "train",
            "--preset",
            "omniglot-5w1s",
            "--meta-steps",
            str(steps),
            "--val-tasks",
            "0",
            "--no-test",
            "--quiet",
            "--threads",
            str(threads),
            "--compile",
            compile,
            "--out",
            f"{tmp}/run",
        ]
        cmd = (
            [sys.executable]
            + (
                ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
                if procs > 1
                else []
            )
            + args
        )
        cmd_shown = ("torchrun --standalone --nproc-per-node 2 " if procs > 1 else "") + " ".join(
            args[1:]
        )
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor"}
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env=env)
        times = [
            json.loads(x)["step_time"]
            for x in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()
        ]
    med = statistics.median(times[2:])  # the first steps warm up
    return {
        "processes": procs,
        "threads_per_process": threads,
        "compile": compile,
        "first_step_s": times[0],
        "median_seconds_per_step": med,
        "steps_per_second": 1.0 / med,
        "command": cmd_shown,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compiles", default="off,pieces", help="comma-separated --compile modes")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be at least 3 (the first two are left out)")
    compiles = [c for c in args.compiles.split(",") if c]
    if not compiles or any(c not in COMPILE for c in compiles):
        ap.error(f"--compiles: choose from {', '.join(COMPILE)} (got {args.compiles!r})")
    rows = []
    for c in compiles:
        for procs, threads in ((1, 2), (2, 1)):
            r = measure(procs, threads, args.steps, c)
            rows.append(r)
            print(
                f"--compile {c}, {procs} process(es) × {threads} thread(s): "
                f"{r['steps_per_second']:.3f} meta-steps/s "
                f"({r['median_seconds_per_step']:.2f} s/step, first step {r['first_step_s']:.1f} s)",
                flush=True,
            )
    write("distributed_throughput", {"config": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
