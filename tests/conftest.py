import os

import pytest
import torch

# Two cores: one process, its threads set deliberately (MEASURED.md: oversubscription is 50-100x slower).
torch.set_num_threads(int(os.environ.get("IMAML_TEST_THREADS", "2")))


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)


def rel(a, b):
    """Global relative difference ‖a − b‖/‖b‖ of two tensors or two parameter dicts."""
    if isinstance(a, dict):
        num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
        den = sum((b[k] ** 2).sum() for k in b)
        return (num / den).sqrt().item()
    return ((a - b).norm() / b.norm()).item()
