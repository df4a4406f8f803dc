import os
from pathlib import Path

import pytest
import torch

# Two cores, threads set deliberately (docs/notebook/prototypes.md: oversubscription is 50-100x slower):
# one process with two threads, or, under pytest-xdist (scripts/test.sh runs two workers),
# one thread per worker, and for the processes the tests start.
if os.environ.get("PYTEST_XDIST_WORKER") and "IMAML_TEST_THREADS" not in os.environ:
    os.environ["IMAML_TEST_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(int(os.environ.get("IMAML_TEST_THREADS", "2")))


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


def conv_setup(dtype=torch.float32, T=3, *, channels=4, seed=0, device="cpu"):
    """(model, θ, TaskBatch): the paper's Omniglot network, narrowed to ``channels``, and T
    random 5-way 1-shot tasks (1 query image per class)."""
    from imaml import TaskBatch
    from imaml.models import OmniglotConvNet

    g = torch.Generator().manual_seed(seed)
    model = OmniglotConvNet(5, channels=channels, generator=g).to(device=device, dtype=dtype)
    x = lambda: torch.rand(T, 5, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.arange(5).repeat(T, 1)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    return model, theta, TaskBatch(x(), y, x(), y).to(device)


def rel(a, b):
    """Global relative difference ‖a − b‖/‖b‖ of two tensors or two parameter dicts."""
    if isinstance(a, dict):
        num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
        den = sum((b[k] ** 2).sum() for k in b)
        return (num / den).sqrt().item()
    return ((a - b).norm() / b.norm()).item()


REAL_DATA = os.environ.get("IMAML_DATA_DIR")
# Tests on the real Omniglot release: run when IMAML_DATA_DIR holds it; CI sets
# IMAML_REQUIRE_DATA so that they run (and fail if the data is missing) rather than skip.
needs_real = pytest.mark.skipif(
    not (REAL_DATA and (Path(REAL_DATA) / "omniglot").is_dir())
    and not os.environ.get("IMAML_REQUIRE_DATA"),
    reason="IMAML_DATA_DIR does not hold the Omniglot release",
)
