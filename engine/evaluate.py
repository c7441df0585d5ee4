"""Evaluation fan-out: many programs x many examples scored concurrently on the pool.

Knows: one thread pool over every (program, example) pair, so all candidates are evaluated at
once and the replicas batch them (dspy evaluates candidates one after another); scores are
percentages (0-100) like ``dspy.Evaluate``. Only an answer that does not parse
(``AdapterParseError``) scores 0 as a wrong answer. Every other exception (LM or pool errors left
after the pool's re-sends to other replicas and DSPy's retries, an engine abort, a dead engine, a
retriever outage, a bug in the metric) is an *error*: never a score — a program's score is taken over
its completed runs only (a program with none has no score: ``TooManyErrors``) —, the error is
counted, and once ``max_errors`` errors happened (dspy's meaning and
default: ``dspy.settings.max_errors``) the remaining pairs are cancelled and ``TooManyErrors``
names the first error and the count. Errors below the limit are added to the active
``ErrorLog`` (``collect_errors()``) so the caller can record them. Also runs a program over
examples with tracing (for bootstrapping). Where the runs happen: in this process's threads, or,
inside ``evaluators(pool)``, spread over ``actors.dspy_side.evaluator`` actors (the driver then only ships
programs and examples and gathers runs; the LM calls they spend are added to the active
``actors.dspy_side.usage`` meter). Does not know the replica pool: calls go through each program's LM.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import dspy

from actors import progress
from actors.dspy_side import usage
from actors.dspy_side.evaluator import EvaluatorConfig, EvaluatorPool, Run, run_jobs
from actors.runtime import stopping

logger = logging.getLogger(__name__)

KEPT_MESSAGES = 5


class TooManyErrors(RuntimeError):
    """``max_errors`` runs failed with an error that is not a parse failure."""


@dataclass
class ErrorLog:
    """Errors (not parse failures) seen while collecting: their count and the first messages."""

    count: int = 0
    runs: int = 0
    messages: list[str] = field(default_factory=list)

    def add(self, errors: list[str], runs: int) -> None:
        self.count += len(errors)
        self.runs += runs
        self.messages.extend(errors[: max(0, KEPT_MESSAGES - len(self.messages))])

    def as_dict(self) -> dict:
        return {"count": self.count, "runs": self.runs, "first": list(self.messages)}


_active_log: contextvars.ContextVar[ErrorLog | None] = contextvars.ContextVar("tandem_error_log", default=None)


@contextlib.contextmanager
def collect_errors() -> Iterator[ErrorLog]:
    """Collect the errors of every ``run_all`` inside the block (in this thread/context)."""
    log = ErrorLog()
    token = _active_log.set(log)
    try:
        yield log
    finally:
        _active_log.reset(token)


_evaluators: EvaluatorPool | None = None


@contextlib.contextmanager
def evaluators(pool: EvaluatorPool | None) -> Iterator[None]:
    """Inside the block, ``run_all`` runs on ``pool``'s evaluator actors (None: in this process)."""
    global _evaluators
    previous, _evaluators = _evaluators, pool
    try:
        yield
    finally:
        _evaluators = previous


@contextlib.contextmanager
def evaluators_of(cfg: EvaluatorConfig) -> Iterator[EvaluatorPool | None]:
    """``cfg.count`` evaluator actors started for the block and used by ``run_all`` in it, then
    stopped (count 0: the block runs in this process)."""
    if not cfg.count:
        yield None
        return
    with EvaluatorPool(cfg) as pool, evaluators(pool):
        yield pool


def run_all(jobs: Sequence[tuple[dspy.Module, dspy.Example]], metric: Callable, *, num_threads: int = 16,
            trace: bool = False, desc: str = "", max_errors: int | None = None) -> list[Run]:
    """Run every (program, example) job concurrently.

    Args:
        jobs: (program, example) pairs.
        metric: ``metric(example, prediction, trace)``; a bool or a number.
        num_threads: concurrent calls.
        trace: collect the dspy trace of each run (for bootstrapping).
        desc: label for logs.
        max_errors: errors (not parse failures) that stop the work; default ``dspy.settings.max_errors``.

    Returns:
        One ``Run`` per job, in order; a parse failure or an error (below the limit) scores 0.

    Raises:
        TooManyErrors: ``max_errors`` jobs raised something other than a parse failure.

    Example:
        >>> runs = run_all([(program, ex) for ex in devset], metric, max_errors=5)  # doctest: +SKIP
    """
    limit = max(1, max_errors if max_errors is not None else dspy.settings.max_errors)
    with progress.bar(desc or "runs", total=len(jobs), unit="run") as shown:
        if _evaluators is not None and jobs:
            meter = usage.active()
            runs, spent = _evaluators.run(jobs, metric, trace=trace, max_errors=limit, metered=meter is not None,
                                          cancelled=stopping, done=shown.update)
            if meter is not None:
                meter.add(spent)
        else:
            runs = run_jobs(jobs, metric, trace=trace, num_threads=num_threads, max_errors=limit, cancelled=stopping,
                            done=shown.update)
    errors = [r.error for r in runs if r.broke]
    label = desc or "runs"
    if len(errors) >= limit:
        raise TooManyErrors(f"{label}: {len(errors)} runs failed with errors (max_errors={limit}; parse failures "
                            f"not counted), the rest was cancelled; first: {errors[0]}")
    parse_failures = sum(r.parse_failure for r in runs)
    if errors or parse_failures:
        logger.info("%s: %d of %d runs did not parse (score 0), %d failed with errors%s", label, parse_failures,
                    len(runs), len(errors), f" (first: {errors[0]})" if errors else "")
    log = _active_log.get()
    if log is not None:
        log.add(errors, len(runs))
    return runs


def evaluate_many(programs: Sequence[dspy.Module], examples: Sequence[dspy.Example], metric: Callable, *,
                  num_threads: int = 16, desc: str = "evaluate") -> list[float | None]:
    """Scores (0-100) of every program on ``examples``, all pairs run concurrently.

    Raises:
        TooManyErrors: see ``run_all``.
    """
    if not examples:
        return [None] * len(programs)
    return [percent(runs) for runs in run_grid(programs, examples, metric, num_threads=num_threads, desc=desc)]


def run_grid(programs: Sequence[dspy.Module], examples: Sequence[dspy.Example], metric: Callable, *,
             num_threads: int = 16, desc: str = "evaluate") -> list[list[Run]]:
    """Every program on every example in one concurrent ``run_all``; the runs of each program, in order.

    Raises:
        TooManyErrors: see ``run_all``.
    """
    jobs = [(p, ex) for p in programs for ex in examples]
    runs = run_all(jobs, metric, num_threads=num_threads, desc=f"{desc} ({len(programs)} x {len(examples)})")
    n = len(examples)
    return [runs[i * n:(i + 1) * n] for i in range(len(programs))]


def percent(runs: Sequence[Run]) -> float:
    """The score (0-100, two decimals) of one program's runs, as ``dspy.Evaluate`` reports it, over the
    runs that completed (a parse failure completed, as a wrong answer; an error did not).

    Raises:
        TooManyErrors: no run completed (every one raised): there is nothing to score.
    """
    done = [r for r in runs if not r.broke]
    if not done:
        first = next((r.error for r in runs if r.broke), "?")
        raise TooManyErrors(f"all {len(runs)} runs of a program failed with errors, none to score; first: {first}")
    return round(100.0 * sum(r.score for r in done) / len(done), 2)
