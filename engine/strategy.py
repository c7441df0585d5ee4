"""Strategy strings (``"p -> w -> p"``): parse, validate against the optimizers, name prefixes.

Knows dspy 3.4.1's rules and error meanings: an empty strategy and an unknown key are
``ValueError``s that list the valid keys. The whole strategy is validated before any work runs.
Does not run anything.
"""

from __future__ import annotations

from typing import Iterable

SEP = " -> "
VANILLA = "vanilla"  # the unoptimized program, a row of the paper's tables
PAPER = (VANILLA, "p", "w", "p -> p", "w -> w", "p -> w", "w -> p", "p -> w -> p")  # the paper's strategies


def parse(strategy: str, keys: Iterable[str]) -> list[str]:
    """Split a strategy into optimizer keys, refusing empty strategies and unknown keys.

    Args:
        strategy: keys joined by ``->`` (spaces around the arrow are optional).
        keys: the optimizer keys available.

    Returns:
        The keys in order, e.g. ``["p", "w", "p"]``.

    Raises:
        ValueError: empty strategy, an empty step, or keys that name no optimizer.

    Example:
        >>> parse("p -> w -> p", ["p", "w"])
        ['p', 'w', 'p']
    """
    if not isinstance(strategy, str) or not strategy.strip():
        raise ValueError("strategy cannot be empty")
    steps = [s.strip() for s in strategy.split("->")]
    if any(not s for s in steps):
        raise ValueError(f"strategy {strategy!r} has an empty step; write keys joined by ' -> '")
    valid = list(keys)
    invalid = [s for s in steps if s not in valid]
    if invalid:
        raise ValueError(f"Strategy contains invalid optimizer keys: {invalid}. Valid keys are: {valid}")
    return steps


def prefix(steps: list[str], upto: int) -> str:
    """The strategy prefix after ``upto`` steps ('' is the unoptimized program)."""
    return SEP.join(steps[:upto])
