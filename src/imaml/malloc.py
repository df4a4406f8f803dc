"""Keep freed CPU memory for reuse, so a meta-step's big tensors do not page-fault every step.

PyTorch's CPU allocator has no cache: every tensor is a ``malloc`` and every release a
``free``. glibc serves a block larger than its mmap threshold (128 KiB, adapting up to
32 MiB) with a fresh ``mmap`` and gives it back to the kernel when it is freed, so the
next allocation of the same size starts from unmapped memory again: one minor page
fault, and the kernel zeroing 4 KiB, per page touched. A batched meta-step allocates
activations of tens to hundreds of MiB (omniglot-5w1s, meta-batch 32, 15 queries: 32 x
75 images x 64 channels x 14 x 14 floats = 120 MiB): 520,000 to 690,000 minor page
faults per step on 2 CPU cores, a quarter of its time (1.93 s per step, 1.47 s without).

``keep_freed_memory()`` sets two of glibc's ``mallopt`` parameters: blocks up to 1 GiB
come from the heap instead of their own mappings, and freed memory at the top of the
heap stays with the process (up to 2 GiB). The same sizes are then reused step after
step without faults. The cost is memory: the process's resident memory does not shrink
after its peak (as with PyTorch's own CUDA caching allocator), and the heap fragments
(the eager peer step's peak grew from 1537 to 2008 MiB; compiled or chunked, by 3-10%).
It changes no numbers, only where the bytes live. ``benchmarks/peers.py`` measures it
(both allocators, page faults per step).

It acts on the whole process and only under glibc (Linux); elsewhere it does nothing
and returns False. On the CPU, ``imaml train`` calls it unless ``--cpu-malloc system``
is given, and ``imaml eval`` as the run was trained (the config field ``cpu_malloc``).
"""

from __future__ import annotations

import ctypes
import platform
import sys

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # 1 GiB; glibc before 2.26 caps it at 32 MiB
TRIM_THRESHOLD = (1 << 31) - 1  # the largest value of mallopt's int argument (2 GiB)

_applied = False


def _libc():
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from the heap and keep freed memory for reuse.

    Returns True when the process's allocator now does so (also on a repeated call), False
    where it cannot (not glibc, or glibc refused the values), leaving the allocator as it was.
    """
    global _applied
    if _applied:
        return True
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    if not any(libc.mallopt(M_MMAP_THRESHOLD, t) == 1 for t in MMAP_THRESHOLDS):
        return False
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    _applied = True
    return True
