"""Shared helpers for the benchmark scripts: timing, peak memory, JSON output."""

from __future__ import annotations

import json
import pathlib
import resource
import statistics
import subprocess
import time

import torch

OUT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results"


def timeit(fn, *, repeats: int, warmup: int = 1) -> dict:
    """Median and spread of wall-clock seconds over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return spread([seconds(fn) for _ in range(repeats)])


def seconds(fn) -> float:
    """Wall-clock seconds of one call of ``fn`` (with the GPU's queue drained, if any)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def spread(ts: list[float]) -> dict:
    """Median, fastest and slowest of the seconds ``ts``, and how many."""
    return {
        "median_s": statistics.median(ts),
        "min_s": min(ts),
        "max_s": max(ts),
        "repeats": len(ts),
    }


def interleaved(fns: dict, *, repeats: int) -> dict[str, dict]:
    """``timeit`` for several functions at once, their calls alternating: ``repeats`` rounds
    of one call of each, in the given order and then reversed, so that a machine whose
    speed drifts over minutes slows them alike and their ratios hold (fresh processes run
    one after another measure the drift as much as the code). Each name's ``spread`` and
    its seconds round by round (``times_s``)."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(seconds(fns[n]))
    return {n: {**spread(ts), "times_s": ts} for n, ts in times.items()}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict:
    """The machine the results were measured on (``imaml.machine.machine_info``)."""
    from imaml.machine import machine_info

    return machine_info()


def write(name: str, payload: dict, out: pathlib.Path = OUT) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    print(f"wrote {path}")
    return path


def use_malloc(mode: str) -> None:
    """``keep``: freed memory kept for reuse, as ``imaml train`` does on the CPU
    (``imaml.keep_freed_memory``); ``system``: glibc's defaults."""
    from imaml import keep_freed_memory

    if mode == "keep" and not keep_freed_memory():
        raise SystemExit("keeping freed memory needs glibc; use --malloc system")


def run_fresh(cmd: list[str], **kwargs) -> dict:
    """Run a benchmark point in a fresh process (its own peak RSS); the JSON object it prints
    last, or ``{"error": <its last stderr line>}`` when it fails."""
    out = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])
