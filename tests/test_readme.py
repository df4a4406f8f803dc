"""The README's Python example runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert set(namespace["g"]) == set(namespace["params"])
    assert namespace["stats"]["query_loss"].shape == (32,)


def test_readme_own_model_example_learns():
    """A CNN with a frozen layer, BatchNorm keeping running statistics, Dropout and a loss
    of its own: query accuracy after adaptation rises over 50 meta-steps for imaml, maml
    and fomaml, running statistics stay untouched, and adapt_implicit's gradient reaches a
    meta-parameter outside θ."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[1], "README.md", "exec"), namespace)
    for name in ("imaml", "maml", "fomaml"):
        start, end = namespace["history"][name]
        assert end > start + 0.02, (name, start, end)
    model = namespace["model"]
    assert model[3].num_batches_tracked.item() == 0  # never updated by a meta-step
    assert torch.equal(model[3].running_mean, torch.zeros(16))
    frozen = namespace["make_model"]()[0].weight
    assert torch.equal(model[0].weight, frozen)  # the frozen layer did not move
    scale = namespace["scale"].grad
    assert scale is not None and torch.isfinite(scale) and scale != 0


def test_readme_commands_exist():
    text = README.read_text()
    assert "bash scripts/setup.sh && .venv/bin/imaml train --preset omniglot-5w1s" in text
    assert "bash scripts/test.sh" in text
    assert "bash scripts/test.sh" in (README.parent / ".ci" / "run").read_text()
