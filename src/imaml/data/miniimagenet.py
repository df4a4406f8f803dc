"""Mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split): 64/16/20 classes, 84×84×3.

The data is not redistributable; supply it in ``<data dir>/miniimagenet/`` in one of
the two common formats:

1. the Ravi–Larochelle split files ``train.csv``, ``val.csv``, ``test.csv`` (header
   ``filename,label``) with the images in ``images/<filename>`` (any size; resized to
   84×84 with an antialiased filter);
2. the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl``, each a dict with
   ``image_data`` (N×84×84×3 uint8 array) and ``class_dict`` (label → list of row
   indices). They are read with a restricted unpickler that only rebuilds NumPy arrays
   and plain containers, so a crafted file cannot run code.

The CSV format is preprocessed once and cached as a uint8 tensor file (beside the data
if writable, else in the user cache), keyed by a hash of the split file and image sizes.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import torch
from PIL import Image

from ..algorithms.base import TaskBatch
from ..models import MiniImagenetConvNet
from .omniglot import DataError, data_root, user_cache, writable

SIZE = 84
SPLITS = ("train", "val", "test")


class _ArraysOnly(pickle.Unpickler):
    """Unpickler that can rebuild NumPy arrays and builtin containers, nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} (only NumPy arrays are allowed)"
        )


def _load_pickle_cache(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            blob = _ArraysOnly(f).load()
    except Exception as e:
        raise DataError(f"{path} is not a readable Mini-ImageNet pickle cache ({e})") from e
    if not isinstance(blob, dict) or "image_data" not in blob or "class_dict" not in blob:
        raise DataError(f"{path}: expected a dict with 'image_data' and 'class_dict'")
    images = torch.as_tensor(blob["image_data"])
    if (
        images.dim() != 4
        or tuple(images.shape[1:]) != (SIZE, SIZE, 3)
        or images.dtype != torch.uint8
    ):
        raise DataError(
            f"{path}: image_data must be N×{SIZE}×{SIZE}×3 uint8, got "
            f"{tuple(images.shape)} {images.dtype}"
        )
    images = images.permute(0, 3, 1, 2).contiguous()
    return {
        str(label): images[torch.as_tensor(list(rows))]
        for label, rows in blob["class_dict"].items()
    }


def _load_csv(folder: Path, split: str) -> dict[str, torch.Tensor]:
    csv_path = folder / f"{split}.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(f"{csv_path}: expected a header 'filename,label'")
    h = hashlib.sha256(csv_path.read_bytes())
    for name, _ in rows[1:]:
        p = folder / "images" / name
        if not p.is_file():
            raise DataError(f"{csv_path} lists {name}, but {p} does not exist")
        h.update(f"{name}:{p.stat().st_size}".encode())
    key = h.hexdigest()[:16]
    cache_name = f"miniimagenet-{split}-{SIZE}px-{key}.pt"
    candidates = ([folder / "cache" / cache_name] if writable(folder) else []) + [
        user_cache() / cache_name
    ]
    for c in candidates:
        if c.exists():
            try:
                return torch.load(c, weights_only=True)
            except Exception:
                c.unlink(missing_ok=True)
    by_label: dict[str, list[torch.Tensor]] = {}
    for name, label in rows[1:]:
        p = folder / "images" / name
        try:
            img = Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
        except Exception as e:
            raise DataError(f"{p} is not a readable image ({e})") from e
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(SIZE, SIZE, 3)
        by_label.setdefault(label, []).append(t.permute(2, 0, 1))
    data = {k: torch.stack(v) for k, v in by_label.items()}
    for c in candidates:
        try:
            c.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=c.parent, suffix=".part")
            with os.fdopen(fd, "wb") as f:
                torch.save(data, f)
            os.replace(tmp, c)
            break
        except OSError:
            continue
    return data


def load_miniimagenet(data_dir=None, split: str = "train") -> dict[str, torch.Tensor]:
    """{class label: uint8 tensor (n, 3, 84, 84)} for one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    folder = data_root(data_dir) / "miniimagenet"
    pkl = folder / f"mini-imagenet-cache-{split}.pkl"
    if pkl.is_file():
        data = _load_pickle_cache(pkl)
    elif (folder / f"{split}.csv").is_file():
        data = _load_csv(folder, split)
    else:
        raise DataError(
            f"Mini-ImageNet {split} split not found in {folder}: expected {split}.csv with images/, "
            f"or mini-imagenet-cache-{split}.pkl (see the README, 'Mini-ImageNet data')"
        )
    if not data:
        raise DataError(f"{folder}: the {split} split has no classes")
    return data


class MiniImagenetTasks:
    """N-way K-shot episodes with Q queries per class; images float in [0, 1], (N·K, 3, 84, 84)."""

    loss = "cross_entropy"
    metric = "accuracy"

    def __init__(self, data: dict[str, torch.Tensor], *, n_way: int, k_shot: int, k_query: int):
        if n_way > len(data):
            raise ValueError(
                f"{n_way}-way tasks need {n_way} classes but the split has {len(data)}"
            )
        smallest = min(v.shape[0] for v in data.values())
        if k_shot + k_query > smallest:
            raise ValueError(
                f"k_shot + k_query = {k_shot + k_query} exceeds the {smallest} images "
                "of the smallest class"
            )
        self.labels = sorted(data)
        self.data = data
        self.n_way, self.k_shot, self.k_query = n_way, k_shot, k_query

    def make_model(self, generator: torch.Generator | None = None):
        return MiniImagenetConvNet(self.n_way, generator=generator)

    def sample(
        self, num_tasks: int, *, generator: torch.Generator, dtype=torch.float32
    ) -> TaskBatch:
        N, K, Q = self.n_way, self.k_shot, self.k_query
        xs, xq = [], []
        for _ in range(num_tasks):
            classes = torch.randperm(len(self.labels), generator=generator)[:N].tolist()
            per = []
            for c in classes:
                imgs = self.data[self.labels[c]]
                per.append(imgs[torch.randperm(imgs.shape[0], generator=generator)[: K + Q]])
            per = torch.stack(per)  # (N, K+Q, 3, 84, 84)
            xs.append(per[:, :K].reshape(N * K, 3, SIZE, SIZE))
            xq.append(per[:, K:].reshape(N * Q, 3, SIZE, SIZE))
        y = lambda k: torch.arange(N).repeat_interleave(k).expand(num_tasks, N * k).contiguous()
        to = lambda xs: torch.stack(xs).to(dtype).div_(255.0)
        return TaskBatch(to(xs), y(K), to(xq), y(Q))
