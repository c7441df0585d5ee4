"""Checking a wrapped optimizer's extra arguments at construction, before any pool is up.

Knows Python signatures only; GEPAStep and MIPROStep pass their dspy class's options through it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable


def check_options(target: Callable, options: dict[str, Any], *, ours: set[str], name: str) -> None:
    """Refuse ``options`` that ``target``'s constructor does not take (``ours``: the ones the step sets itself).

    Raises:
        ValueError: naming the unknown arguments and the ones ``target`` takes.

    Example:
        >>> check_options(dict.fromkeys, {"bogus": 1}, ours=set(), name="fromkeys")
        Traceback (most recent call last):
        ...
        ValueError: fromkeys does not take ['bogus']; its arguments: ['iterable', 'value']
    """
    taken = set(inspect.signature(target).parameters) - {"self"} - ours
    unknown = sorted(set(options) - taken)
    if unknown:
        raise ValueError(f"{name} does not take {unknown}; its arguments: {sorted(taken)}")
