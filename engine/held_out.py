"""Held-out scores: each step's program on the test split, which no step ever saw, with how
varied its answers are.

A valset score is what the optimizer selected on; only the test split says whether the program
got better. A score alone can hide a program that answers one class to everything (a third of
Iris right), so each result also counts the distinct answers of the last output field and the
share of the most common one, beside the same counts for the gold labels. Knows ``run_grid``
(every program x example concurrently, parse failures score 0, errors count against
``max_errors``); does not know run dirs or pools.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import dspy

from engine.evaluate import percent, run_grid

ONE_ANSWER_SHARE = 0.9  # a program whose most common answer is at least this share answers "one thing"


@dataclass(frozen=True)
class HeldOut:
    """One program on the test split.

    ``field`` is the output field the answers are counted on (the program's last output field),
    ``answered`` how many runs gave it a value, ``top`` / ``top_count`` the most common answer
    (whitespace and case folded); ``gold_*`` the same for the examples' labels (None if absent).
    """

    score: float
    n: int
    parse_failures: int
    errors: int
    field: str | None
    answered: int
    distinct: int
    top: str | None
    top_count: int
    gold_distinct: int | None
    gold_top_count: int | None

    @property
    def one_answer(self) -> bool:
        """The program gives (nearly) one answer to everything while the labels vary."""
        if not self.answered or not self.gold_distinct or self.gold_distinct < 2:
            return False
        gold_top_share = (self.gold_top_count or 0) / self.n
        return self.top_count / self.answered >= ONE_ANSWER_SHARE and gold_top_share < ONE_ANSWER_SHARE

    def describe(self) -> str:
        """E.g. ``3 distinct; most common 'setosa' 46/50 (gold: 3 distinct, most common 17/50)``."""
        if self.top is None:
            return "no answer parsed"
        text = f"{self.distinct} distinct; most common {self.top!r} {self.top_count}/{self.answered}"
        if self.gold_distinct:
            text += f" (gold: {self.gold_distinct} distinct, most common {self.gold_top_count}/{self.n})"
        return text + (" - answers one thing" if self.one_answer else "")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HeldOut":
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


def score_held_out(programs: Sequence[dspy.Module], test: Sequence[dspy.Example], metric: Callable, *,
                   num_threads: int = 16, desc: str = "held-out test") -> list[HeldOut]:
    """Every program on every test example, concurrently; one ``HeldOut`` per program, in order.

    Raises:
        ValueError: an empty test split.
        TooManyErrors: see ``engine.evaluate.run_all``.
    """
    if not test:
        raise ValueError("the test split is empty")
    grid = run_grid(programs, test, metric, num_threads=num_threads, desc=desc)
    return [_summary(program, test, runs) for program, runs in zip(programs, grid)]


def _summary(program: dspy.Module, test: Sequence[dspy.Example], runs) -> HeldOut:
    field = _answer_field(program)
    answers = Counter(_norm(getattr(r.prediction, field, None)) for r in runs if r.prediction is not None and field)
    answers.pop(None, None)
    gold = Counter(_norm(ex.get(field)) for ex in test) if field else Counter()
    gold.pop(None, None)
    top, count = answers.most_common(1)[0] if answers else (None, 0)
    return HeldOut(
        # a result with errors is never stored or shown (callers check ``errors``); all broken: nothing to score
        score=percent(runs) if any(not r.broke for r in runs) else 0.0, n=len(runs),
        parse_failures=sum(r.parse_failure for r in runs),
        errors=sum(r.error is not None and not r.parse_failure for r in runs), field=field,
        answered=sum(answers.values()), distinct=len(answers), top=top, top_count=count,
        gold_distinct=len(gold) or None, gold_top_count=gold.most_common(1)[0][1] if gold else None)


def _answer_field(program: dspy.Module) -> str | None:
    """The last output field of the program's last predictor (the answer, by DSPy convention)."""
    predictors = program.predictors()
    if not predictors:
        return None
    fields = list(predictors[-1].signature.output_fields)
    return fields[-1] if fields else None


def _norm(value) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split()).lower()
    return text or None
