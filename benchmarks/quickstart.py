"""The README's main job, timed as a new user runs it: a fresh clone, then the command.

Clones the repository's HEAD into a temporary folder, runs the README's quickstart
command there (set-up included), and writes what it printed, the seconds it took and
the machine to docs/results/quickstart.json. Run it on a quiet machine:

    python benchmarks/quickstart.py          # IMAML_DATA_DIR may point at the data
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from common import OUT, machine

ROOT = Path(__file__).resolve().parents[1]
COMMAND = (
    "bash scripts/setup.sh && .venv/bin/imaml train --preset omniglot-5w1s "
    "--meta-steps 400 --out runs/quickstart"
)


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    if COMMAND not in readme:
        raise SystemExit("quickstart.py: the README's main-job command has changed; update COMMAND")
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "imaml"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["bash", "-c", COMMAND + " --quiet"], cwd=clone, capture_output=True, text=True
        )
        seconds = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0:
        raise SystemExit(f"quickstart failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    train = next(line for line in lines if "meta-steps in" in line)
    test = next(line for line in lines if line.startswith("test accuracy"))
    acc = re.search(r"test accuracy: ([\d.]+)% ± ([\d.]+)%", test)
    payload = {
        "command": COMMAND,
        "seconds_total": seconds,
        "s_per_step": float(re.search(r"\(([\d.]+) s/step", train).group(1)),
        "test_acc": float(acc.group(1)) / 100,
        "ci95": float(acc.group(2)) / 100,
        "output": [train, test],
        "machine": machine(),
    }
    out = OUT / "quickstart.json"
    out.write_text(json.dumps(payload, indent=1))
    print(f"{seconds:.0f} s in all\n{train}\n{test}\nwritten: {out}")


if __name__ == "__main__":
    main()
