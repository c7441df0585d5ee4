"""Evaluation fan-out: many programs x many examples scored concurrently on the pool.

Knows: one thread pool over every (program, example) pair, so all candidates are evaluated at
once and the replicas batch them (dspy evaluates candidates one after another); a failed call
or a parse failure scores 0 for that pair instead of aborting the evaluation; scores are
percentages (0-100) like ``dspy.Evaluate``. Also runs a program over examples with tracing
(for bootstrapping). Does not know the pool: calls go through each program's LM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import dspy
from dspy.utils.parallelizer import ParallelExecutor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One program run on one example: its prediction (None on failure), score, trace, error."""

    example_index: int
    prediction: dspy.Prediction | None
    score: float
    trace: tuple = ()
    error: str | None = None


def run_all(jobs: Sequence[tuple[dspy.Module, dspy.Example]], metric: Callable, *, num_threads: int = 16,
            trace: bool = False, desc: str = "") -> list[Run]:
    """Run every (program, example) job concurrently; never raises for a single failure.

    Args:
        jobs: (program, example) pairs.
        metric: ``metric(example, prediction, trace)``; a bool or a number.
        num_threads: concurrent calls.
        trace: collect the dspy trace of each run (for bootstrapping).
        desc: label for logs.

    Returns:
        One ``Run`` per job, in order.
    """

    def one(job_index: int) -> Run:
        program, example = jobs[job_index]
        try:
            with dspy.context(trace=[]):
                prediction = program(**example.inputs())
                steps = tuple(dspy.settings.trace) if trace else ()
            score = metric(example, prediction, steps if trace else None)
            return Run(job_index, prediction, float(score or 0), steps)
        except Exception as exc:  # a parse failure or LM error: this pair fails, the rest go on
            return Run(job_index, None, 0.0, (), f"{type(exc).__name__}: {exc}")

    executor = ParallelExecutor(num_threads=max(1, num_threads), max_errors=len(jobs) + 1,
                                disable_progress_bar=not desc, provide_traceback=False)
    runs = executor.execute(one, list(range(len(jobs))))
    failures = [r for r in runs if r.error]
    if failures:
        logger.info("%s: %d of %d runs failed (first: %s)", desc or "runs", len(failures), len(runs), failures[0].error)
    return runs


def evaluate_many(programs: Sequence[dspy.Module], examples: Sequence[dspy.Example], metric: Callable, *,
                  num_threads: int = 16, desc: str = "evaluate") -> list[float]:
    """Scores (0-100) of every program on ``examples``, all pairs run concurrently."""
    if not examples:
        return [None] * len(programs)
    jobs = [(p, ex) for p in programs for ex in examples]
    runs = run_all(jobs, metric, num_threads=num_threads, desc=f"{desc} ({len(programs)} x {len(examples)})")
    n = len(examples)
    return [round(100.0 * sum(r.score for r in runs[i * n:(i + 1) * n]) / n, 2) for i in range(len(programs))]
