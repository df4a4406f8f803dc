"""imaml.malloc: freed CPU memory is kept for reuse, counted in page faults, not timed."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import imaml.malloc
from imaml.checkpoint import load_checkpoint
from imaml.config import from_preset
from imaml.runtime import setup_runtime

glibc = pytest.mark.skipif(imaml.malloc._libc() is None, reason="glibc only")

# Allocate and free a 64 MiB tensor (16,384 pages) twelve times; print the minor page
# faults of the last nine (glibc's heap settles in the first three).
FAULTS = textwrap.dedent(
    """
    import resource, sys, torch, imaml
    if sys.argv[1] == "keep":
        assert imaml.keep_freed_memory() and imaml.keep_freed_memory()
    for _ in range(3):
        torch.ones(1 << 24)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(9):
        torch.ones(1 << 24)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def minor_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@glibc
def test_freed_memory_is_reused_without_page_faults():
    pages = 9 * (1 << 24) * 4 // 4096
    assert minor_faults("system") > pages // 2  # glibc maps and unmaps the block every time
    # the block comes back from the heap: at most one of the nine allocations faulted in
    # afresh (a clean-clone CI run once saw exactly one, 16,384 faults; usually ~0)
    assert minor_faults("keep") <= pages // 9 + 256


def test_without_glibc_it_does_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(imaml.malloc, "_applied", False)
    monkeypatch.setattr(imaml.malloc.platform, "libc_ver", lambda: ("", ""))
    assert imaml.malloc.keep_freed_memory() is False


@pytest.mark.parametrize("mode,calls", [("keep", 1), ("system", 0)])
def test_training_setup_applies_the_configured_allocator(monkeypatch, mode, calls):
    seen = []
    monkeypatch.setattr("imaml.runtime.keep_freed_memory", lambda: seen.append(1))
    cfg = from_preset("sinusoid", cpu_malloc=mode, device="cpu")
    assert setup_runtime(cfg) == (torch.device("cpu"), torch.float32)
    assert len(seen) == calls


@glibc
def test_training_is_bit_identical_with_either_allocator(tmp_path):
    params = {}
    for mode in ("system", "keep"):
        out = tmp_path / mode
        subprocess.run(
            [sys.executable, "-m", "imaml", "train", "--task", "sinusoid", "--meta-steps", "3",
             "--meta-batch", "4", "--val-tasks", "0", "--no-test", "--quiet", "--threads", "1",
             "--device", "cpu", "--cpu-malloc", mode, "--out", str(out)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        assert json.loads((out / "config.json").read_text())["cpu_malloc"] == mode
        params[mode] = load_checkpoint(out / "last.pt")["params"]
    for k, v in params["system"].items():
        assert torch.equal(v, params["keep"][k]), k
