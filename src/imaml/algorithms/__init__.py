"""Meta-learning algorithms, one file each, one signature, looked up by name."""

from __future__ import annotations

import inspect

from .base import MetaAlgorithm, TaskBatch
from .fomaml import FOMAML
from .imaml import IMAML
from .maml import MAML
from .reptile import Reptile

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {
    "imaml": IMAML,
    "maml": MAML,
    "fomaml": FOMAML,
    "reptile": Reptile,
}


def hyperparameter_names(name: str) -> list[str]:
    cls = ALGORITHMS[name]
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def make_algorithm(name: str, **hyperparameters) -> MetaAlgorithm:
    """The algorithm ``name`` (one of ``ALGORITHMS``) with keyword-only hyperparameters.

    ``model`` (a torch.nn.Module) is required; ``loss`` is "cross_entropy" (default),
    "mse" or "half_sse". Unknown names or hyperparameters raise ValueError.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    accepted = hyperparameter_names(name)
    unknown = sorted(set(hyperparameters) - set(accepted))
    if unknown:
        raise ValueError(f"{name} does not take {unknown}; it accepts {accepted}")
    if "model" not in hyperparameters:
        raise ValueError(f"{name} needs model= (a torch.nn.Module)")
    return ALGORITHMS[name](**hyperparameters)


__all__ = [
    "ALGORITHMS",
    "FOMAML",
    "IMAML",
    "MAML",
    "MetaAlgorithm",
    "Reptile",
    "TaskBatch",
    "hyperparameter_names",
    "make_algorithm",
]
