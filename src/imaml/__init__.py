"""imaml: meta-learning with implicit gradients (Rajeswaran, Finn, Kakade, Levine 2019)."""

from .algorithms import ALGORITHMS, MetaAlgorithm, TaskBatch, make_algorithm
from .autodiff import hvp, linearize_grad
from .implicit import adapt_implicit, implicit_meta_grad, implicit_operator
from .inner import adapt
from .linalg import cg, exact, minres, neumann, solve
from .malloc import keep_freed_memory

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "MetaAlgorithm",
    "TaskBatch",
    "adapt",
    "adapt_implicit",
    "cg",
    "exact",
    "hvp",
    "implicit_meta_grad",
    "implicit_operator",
    "keep_freed_memory",
    "linearize_grad",
    "make_algorithm",
    "minres",
    "neumann",
    "solve",
]
