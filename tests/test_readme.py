"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert set(namespace["g"]) == set(namespace["params"])
    assert namespace["stats"]["query_loss"].shape == (32,)


def test_readme_commands_exist():
    text = README.read_text()
    assert "bash scripts/setup.sh && .venv/bin/imaml train --preset omniglot-5w1s" in text
    assert "bash scripts/test.sh" in text
    assert "bash scripts/test.sh" in (README.parent / ".ci" / "run").read_text()
