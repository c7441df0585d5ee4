"""The table's config and cells: which strategies and seeds, in which order, and one result per cell.

Knows the strategies' canonical form, that shared prefixes run once (``plan``: shorter strategies
first, each continuing the longest one that is its prefix) and what a cell records. Does not run
anything (``engine.table.runner`` does) or write files (``engine.table.report``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.typed_config import typed_config
from engine import strategy as strategies
from engine.config import RunConfig
from engine.steps.kinds import DEFAULT_STEPS

VANILLA = strategies.VANILLA


@typed_config
class TableConfig:
    """One table: a run config (program, model, budget) applied to every strategy and seed; values typed by field."""

    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "program, model and budget"})
    strategies: tuple[str, ...] = field(default=strategies.PAPER, metadata={"help": "rows of the table"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "data splits and optimizer seeds"})
    out_dir: str = field(default="runs/table-iris", metadata={"help": "one run dir per seed and strategy"})
    test_size: int = field(default=0, metadata={"help": "test examples (0 = the whole test split)"})

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        if self.test_size < 0:
            raise ValueError("test_size must be >= 0")
        normalize(self.strategies, self.run.step_table())


@dataclass(frozen=True)
class Cell:
    """One strategy on one seed: test and dev scores (%), or the reason there are none."""

    strategy: str
    seed: int
    test_score: float | None
    dev_score: float | None
    reason: str | None
    run_dir: str
    wall_s: float
    held_out: dict | None = None  # ``HeldOut.as_dict()``: the test answers' diversity


def normalize(names: tuple[str, ...] | list[str], keys=DEFAULT_STEPS) -> list[str]:
    """Strategies in canonical form (``"p->w"`` -> ``"p -> w"``; ``vanilla`` stays), validated against
    the step ``keys`` (default the built-in ones).

    Raises:
        ValueError: an empty list, an invalid strategy, or the same strategy twice.
    """
    if not names:
        raise ValueError("no strategies given")
    out = [VANILLA if n.strip() == VANILLA else strategies.SEP.join(strategies.parse(n, keys)) for n in names]
    twice = sorted({n for n in out if out.count(n) > 1})
    if twice:
        raise ValueError(f"strategies listed twice: {twice}")
    return out


def plan(names: list[str], keys=DEFAULT_STEPS) -> list[tuple[str, str | None]]:
    """The order to run strategies in (shorter first) and, for each, the strategy it continues.

    Example:
        >>> plan(["p -> w", "vanilla", "p"])
        [('vanilla', None), ('p', None), ('p -> w', 'p')]
    """
    order = sorted(normalize(names, keys), key=lambda s: 0 if s == VANILLA else len(s.split(strategies.SEP)))
    steps = {s: s.split(strategies.SEP) for s in order if s != VANILLA}
    out: list[tuple[str, str | None]] = []
    for s in order:
        parents = [p for p, _ in out if p != VANILLA and len(steps[p]) < len(steps[s]) and steps[s][:len(steps[p])] == steps[p]]
        out.append((s, max(parents, key=lambda p: len(steps[p]), default=None)))
    return out
