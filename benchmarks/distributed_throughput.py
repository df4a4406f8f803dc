"""Meta-steps per second with 1 and 2 processes (torchrun, gloo) on this machine.

omniglot-5w1s iMAML, meta-batch 32, ``--steps`` meta-steps per configuration, no
validation; the figure is 1 / the median step time (rank 0's, which includes the
all-reduce). 1 process uses 2 threads; 2 processes use 1 thread each (never more
threads than cores). Writes docs/benchmarks/distributed_throughput.json.

    python benchmarks/distributed_throughput.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write

ROOT = Path(__file__).resolve().parents[1]


def measure(procs: int, threads: int, steps: int) -> dict:
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
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        times = [
            json.loads(x)["step_time"]
            for x in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()
        ]
    med = statistics.median(times[2:])  # the first steps warm up
    return {
        "processes": procs,
        "threads_per_process": threads,
        "median_seconds_per_step": med,
        "steps_per_second": 1.0 / med,
        "command": cmd_shown,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    rows = [measure(1, 2, args.steps), measure(2, 1, args.steps)]
    for r in rows:
        print(
            f"{r['processes']} process(es) × {r['threads_per_process']} thread(s): "
            f"{r['steps_per_second']:.3f} meta-steps/s ({r['median_seconds_per_step']:.2f} s/step)"
        )
    write("distributed_throughput", {"config": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
