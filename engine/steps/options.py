"""What GEPAStep and MIPROStep share: their dspy class's extra arguments checked at construction, before any
pool is up, and the program's LM given room for an instruction (their reflection / prompt model's default).

Knows Python signatures and ``dspy.LM.copy``; not the optimizers.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

INSTRUCTION_MAX_TOKENS = 512  # a new instruction is longer than most answers; the program's max_tokens may be small


def with_room(lm, **changes: Any):
    """A copy of ``lm`` (with ``changes``) that may write at least ``INSTRUCTION_MAX_TOKENS`` tokens."""
    return lm.copy(max_tokens=max(lm.kwargs.get("max_tokens") or 0, INSTRUCTION_MAX_TOKENS), **changes)


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
