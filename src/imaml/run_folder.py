"""A training run's folder: checks before training, the lock, signals, and the files
written beside the checkpoints (the metrics log trimmed on resume, machine.json).

The metrics log is ``metrics.jsonl``, one JSON object a line, which a run appends to. A
long run's log can be folded into ``metrics.jsonl.gz`` between runs (``compress_metrics``,
what the committed Table 2 folders do); the log is then the lines of the ``.gz`` followed
by those of ``metrics.jsonl``, and every reader goes through ``metric_lines``."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import threading
from pathlib import Path

from .data.omniglot import writable

# a run folder holds two checkpoints (< 10 MiB each for the paper's nets)
MIN_FREE_BYTES = 64 * 2**20


def prepare_folder(out: Path, *, resume: bool) -> None:
    """Checks before training: a folder, not holding another run, writable, with free space."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if not resume and (out / "last.pt").exists():
        raise ValueError(
            f"{out} already holds a run (last.pt); pass --resume to continue it or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder {out} ({e.strerror or e})") from e
    if not writable(out):
        raise ValueError(f"output folder {out} is not writable")
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise ValueError(
            f"only {free / 2**20:.0f} MiB free in {out}; checkpoints need at least "
            f"{MIN_FREE_BYTES / 2**20:.0f} MiB"
        )
    for tmp in out.glob(".*.pt.*.tmp"):  # left by a checkpoint write that was killed
        tmp.unlink(missing_ok=True)


class RunLock:
    """``RUN_DIR/.lock`` holding the owner's PID: a second live run into the same folder is refused.

    A lock left by a process that no longer exists (a killed run) is taken over.
    """

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if pid := _owner(self.path):
                    raise ValueError(
                        f"{self.path.parent} is in use by another imaml run (pid {pid}); wait for "
                        "it to finish or choose another --out"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return
        raise ValueError(f"could not take the lock {self.path}")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _owner(lock: Path) -> int:
    """The PID of the live process, other than this one, that holds ``lock``; 0 if none."""
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
    return pid if pid and pid != os.getpid() and _alive(pid) else 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and returns."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


METRICS, METRICS_GZ = "metrics.jsonl", "metrics.jsonl.gz"


def metric_lines(folder: Path) -> list[str]:
    """The folder's log lines in the order written: ``metrics.jsonl.gz``, then ``metrics.jsonl``."""
    return _lines(Path(folder) / METRICS_GZ) + _lines(Path(folder) / METRICS)


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    if path.suffix != ".gz":
        return path.read_text().splitlines()
    try:
        with gzip.open(path, "rt") as f:
            return f.read().splitlines()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not a complete gzip file ({e}); restore it from git") from None


def trim_metrics(folder: Path, step: int) -> None:
    """Drop log lines written after ``step`` (by a run that died after its last checkpoint),
    and lines cut by a crash."""

    def keep(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    gz, plain = Path(folder) / METRICS_GZ, Path(folder) / METRICS
    lines = _lines(gz)
    if (kept := [x for x in lines if keep(x)]) != lines:  # the .gz only when it must change
        _replace(gz, gzip.compress("".join(x + "\n" for x in kept).encode(), mtime=0))
    if plain.exists():  # always: this also ends a line cut before its newline
        _replace(plain, "".join(x + "\n" for x in _lines(plain) if keep(x)).encode())


def compress_metrics(folder: Path) -> bool:
    """Fold ``metrics.jsonl`` into ``metrics.jsonl.gz`` as one more gzip member, so that the
    bytes already there (and their history in git) stay as they are. Not while a run holds
    the folder's lock: it is still appending. Returns whether anything was folded."""
    plain, packed = Path(folder) / METRICS, Path(folder) / METRICS_GZ
    if not plain.exists() or _owner(Path(folder) / ".lock"):
        return False
    text = plain.read_bytes()
    if text and not text.endswith(b"\n"):  # a line cut by a crash stays a line of its own
        text += b"\n"
    _replace(
        packed, (packed.read_bytes() if packed.exists() else b"") + gzip.compress(text, mtime=0)
    )
    plain.unlink()
    return True


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def record_machine(out: Path, machine: dict) -> None:
    """Append this run's machine to the folder's machine.json (one entry per start or
    resume, with the step it started from), written atomically."""
    path = out / "machine.json"
    runs = []
    if path.exists():
        try:
            runs = json.loads(path.read_text())["runs"]
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable record is replaced, never fatal to training
    runs = [r for r in runs if r.get("from_step", 0) < machine["from_step"]] + [machine]
    write_json(path, {"runs": runs})


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename: never half-written."""
    _replace(path, json.dumps(obj, indent=1).encode())
