"""The one-line checks every public entry point makes of its numbers and names.

Written once here and used by the config (``ConfigError``), the algorithms, the inner
loop, the implicit gradient and the linear solvers (``ValueError``); each names the
argument and what it must be.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def check_int(name: str, value, minimum: int = 0, *, error: type = ValueError) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_number(name: str, value, *, positive: bool, error: type = ValueError) -> None:
    """A finite real number, > 0 (``positive``) or >= 0."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise error(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
        )


def check_choice(name: str, value, options: Iterable[str], *, error: type = ValueError) -> None:
    options = tuple(options)
    if value not in options:
        raise error(f"unknown {name} {value!r}; choose one of {', '.join(options)}")
