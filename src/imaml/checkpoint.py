"""Checkpoints: one file, written atomically, loaded without executing code.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts, saved with
``torch.save`` to a temporary file in the same folder, flushed and fsynced, then
renamed over the old one (``os.replace`` is atomic on POSIX): a crash leaves either the
previous complete checkpoint or the new one, never a truncated file. Loading uses
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: unreadable, truncated, foreign or non-finite."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Atomically write ``state`` to ``path``; refuses non-finite parameters."""
    path = Path(path)
    for k, v in state.get("params", {}).items():
        if not torch.isfinite(v).all():
            raise CheckpointError(f"refusing to save {path}: parameter {k!r} is not finite")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(
            f"cannot write a checkpoint in {path.parent} ({e.strerror or e})"
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        kept = " (the previous checkpoint is intact)" if path.exists() else ""
        raise CheckpointError(f"could not write {path}: {e.strerror or e}{kept}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


REQUIRED_KEYS = ("format", "params", "config", "step")
FORMAT = "imaml-checkpoint-v1"


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint``; CheckpointError names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable imaml checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if (
        not isinstance(state, dict)
        or state.get("format") != FORMAT
        or any(k not in state for k in REQUIRED_KEYS)
    ):
        raise CheckpointError(f"{path} is not an imaml checkpoint (format {FORMAT} expected)")
    return state
