"""Data-parallel training with torchrun (gloo, 2 processes on CPU) equals one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imaml.checkpoint import load_checkpoint
from imaml.distributed import Dist

from conftest import needs_real

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SINUSOID = [
    "--task",
    "sinusoid",
    "--meta-batch",
    "5",
    "--threads",
    "1",
    "--dtype",
    "float64",
    "--quiet",
    "--val-every",
    "3",
    "--val-tasks",
    "7",
    "--test-tasks",
    "9",
]


def failure(proc) -> str:
    """What a failed run printed: its stderr's start (where a rank's own error lands) and
    end (torchrun's summary of which rank failed how)."""
    err = proc.stderr
    return err if len(err) <= 6000 else f"{err[:4000]}\n[...]\n{err[-2000:]}"


def run(argv, *, procs, timeout=180):
    cmd = (TORCHRUN if procs == 2 else [sys.executable]) + ["-m", "imaml", "train", *argv]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def params(run_dir):
    return load_checkpoint(Path(run_dir) / "last.pt")["params"]


def close(a, b, tol=1e-12):
    return all(((a[k] - b[k]).norm() / a[k].norm().clamp(min=1e-30)) < tol for k in a)


def test_shards_cover_the_batch_in_order():
    for n in (5, 6, 7, 32):
        for world in (1, 2, 3):
            parts = [Dist(r, world).shard(n) for r in range(world)]
            idx = [i for s in parts for i in range(n)[s]]
            assert idx == list(range(n))
            assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1


def test_a_torchrun_rank_exits_without_interpreter_teardown(monkeypatch):
    """``imaml`` under torchrun ends with os._exit(status) (a rank that finished must not
    abort in PyTorch's exit-time teardown); a single process exits normally."""
    import imaml.cli as cli

    class HardExit(Exception):
        pass

    def hard_exit(code):
        exits.append(code)
        raise HardExit  # os._exit does not return

    exits = []
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", hard_exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(HardExit):
        cli.run()
    assert exits == [3]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as e:
        cli.run()
    assert e.value.code == 3 and exits == [3]


def test_two_processes_equal_one_on_sinusoid_with_an_uneven_split(tmp_path):
    one = run(SINUSOID + ["--meta-steps", "6", "--out", str(tmp_path / "one")], procs=1)
    two = run(SINUSOID + ["--meta-steps", "6", "--out", str(tmp_path / "two")], procs=2)
    assert one.returncode == 0 and two.returncode == 0, failure(two)
    assert close(params(tmp_path / "one"), params(tmp_path / "two"))
    strip = lambda p: [
        {k: v for k, v in json.loads(x).items() if k != "step_time"}
        for x in (p / "metrics.jsonl").read_text().splitlines()
    ]
    a, b = strip(tmp_path / "one"), strip(tmp_path / "two")
    assert len(a) == len(b) == 8  # 6 train lines and 2 validations, written once (rank 0)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(
            abs(x[k] - y[k]) < 1e-9 for k in x if isinstance(x[k], float)
        )
    e1 = json.loads((tmp_path / "one" / "eval.json").read_text())
    e2 = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert (
        abs(e1["mean"] - e2["mean"]) < 1e-12 and e2["tasks"] == 9
    )  # evaluation split and gathered
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == [
        "best.pt",
        "config.json",
        "eval.json",
        "last.pt",
        "learning_curve.png",
        "machine.json",
        "metrics.jsonl",
    ]
    runs = json.loads((tmp_path / "two" / "machine.json").read_text())["runs"]
    assert [r["processes"] for r in runs] == [2]
    assert e2["machine"]["processes"] == 2
    assert two.stdout.count("meta-steps in") == 1  # rank 0 alone reports


def test_a_distributed_run_resumes_exactly(tmp_path):
    ref = run(
        SINUSOID + ["--meta-steps", "6", "--out", str(tmp_path / "ref"), "--no-test"], procs=1
    )
    a = run(SINUSOID + ["--meta-steps", "3", "--out", str(tmp_path / "d"), "--no-test"], procs=2)
    b = run(
        SINUSOID + ["--meta-steps", "6", "--out", str(tmp_path / "d"), "--no-test", "--resume"],
        procs=2,
    )
    assert ref.returncode == a.returncode == b.returncode == 0, failure(b)
    assert close(params(tmp_path / "ref"), params(tmp_path / "d"))


def test_a_killed_rank_ends_the_job_and_it_resumes(tmp_path):
    out = tmp_path / "d"
    cmd = TORCHRUN + [
        "-m",
        "imaml",
        "train",
        *SINUSOID,
        "--meta-steps",
        "100000",
        "--compile",
        "off",  # a long schedule; the test is about a killed rank, not compiling
        "--val-tasks",
        "0",
        "--checkpoint-every",
        "5",
        "--dist-timeout",
        "20",
        "--out",
        str(out),
    ]
    job = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 90
    while not (out / "last.pt").exists():
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.2)
    workers = subprocess.run(
        ["pgrep", "-f", f"imaml train .*{out}"], capture_output=True, text=True
    ).stdout.split()
    workers = [int(p) for p in workers if int(p) != job.pid]
    assert len(workers) >= 2
    t0 = time.time()
    os.kill(max(workers), signal.SIGKILL)
    _, err = job.communicate(timeout=60)
    assert job.returncode != 0 and time.time() - t0 < 45  # a clean failure, not a hang
    assert "SIGKILL" in err or "Signal 9" in err
    step = load_checkpoint(out / "last.pt")["step"]
    again = run(
        SINUSOID
        + [
            "--meta-steps",
            str(step + 2),
            "--out",
            str(out),
            "--resume",
            "--no-test",
            "--val-tasks",
            "0",
            "--checkpoint-every",
            "5",
        ],
        procs=2,
    )
    assert again.returncode == 0, failure(again)
    assert load_checkpoint(out / "last.pt")["step"] == step + 2


def test_a_rendezvous_that_cannot_complete_fails_in_bounded_time(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    t0 = time.time()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imaml",
            "train",
            "--task",
            "sinusoid",
            "--meta-steps",
            "2",
            "--dist-timeout",
            "3",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and time.time() - t0 < 30
    assert "could not join the process group" in r.stderr and "Traceback" not in r.stderr


@needs_real
def test_two_processes_equal_one_on_omniglot(tmp_path):
    argv = [
        "--preset",
        "omniglot-5w1s",
        "--meta-steps",
        "3",
        "--meta-batch",
        "3",
        "--inner-steps",
        "2",
        "--dtype",
        "float64",
        "--threads",
        "1",
        "--quiet",
        "--val-tasks",
        "0",
        "--no-test",
    ]
    one = run(argv + ["--out", str(tmp_path / "one")], procs=1)
    two = run(argv + ["--out", str(tmp_path / "two")], procs=2)
    assert one.returncode == 0 and two.returncode == 0, failure(two)
    assert close(params(tmp_path / "one"), params(tmp_path / "two"), tol=1e-10)
    assert torch.equal(
        load_checkpoint(tmp_path / "one" / "last.pt")["rng"]["tasks"],
        load_checkpoint(tmp_path / "two" / "last.pt")["rng"]["tasks"],
    )
