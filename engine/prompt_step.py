"""``PromptStep``: the paper's prompt optimizer (BootstrapFewShotWithRandomSearch), in parallel.

Same candidate semantics as dspy 3.4.1's BFRS: seed -3 zero-shot, -2 labelled demos only, -1
bootstrapped demos in trainset order, seeds >= 0 a shuffled trainset and a random number
(1..max) of bootstrapped demos, topped up with labelled ones. Differences that matter at scale:
the teacher runs over the whole trainset once, concurrently, and every candidate draws its demos
from those traces; then all candidates x valset run concurrently; and candidates are scored
with the program's current LM (after fine-tuning, the adapter), not ``settings.lm``. Ties keep
the earlier candidate. Does not know Ray: calls go through the program's LM.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from engine.bootstrap import Trace, as_demo, bootstrap
from engine.evaluate import evaluate_many

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A scored program: ``strategy`` is the strategy prefix (BetterTogether) or the seed (prompt step)."""

    program: dspy.Module
    score: float | None
    strategy: str

    def __getitem__(self, key: str):  # dspy 3.4.1 callers index candidates like dicts
        return getattr(self, key)


class PromptStep(Teleprompter):
    """Parallel BootstrapFewShotWithRandomSearch.

    Args:
        metric: ``metric(example, prediction, trace)``.
        num_candidate_programs: random candidates besides the three fixed seeds (paper: 6).
        max_bootstrapped_demos: bootstrapped demos per predictor, at most (paper: 3).
        max_labeled_demos: demos per predictor in all, at most (paper: 3).
        num_threads: concurrent LM calls.
        seed: base seed for candidate shuffles.

    Example:
        >>> step = PromptStep(metric, num_candidate_programs=6)  # doctest: +SKIP
        >>> best = step.compile(program, trainset=train, valset=val)  # doctest: +SKIP
    """

    def __init__(self, metric: Callable, num_candidate_programs: int = 6, max_bootstrapped_demos: int = 3,
                 max_labeled_demos: int = 3, num_threads: int = 16, seed: int = 0):
        if num_candidate_programs < 0 or max_bootstrapped_demos < 0 or max_labeled_demos < 0:
            raise ValueError("candidate and demo counts must be >= 0")
        self.metric = metric
        self.num_candidate_programs = num_candidate_programs
        self.max_bootstrapped_demos = max_bootstrapped_demos
        self.max_labeled_demos = max_labeled_demos
        self.num_threads = num_threads
        self.seed = seed

    def compile(self, student: dspy.Module, *, trainset: list, teacher=None,
                valset: list | None = None) -> dspy.Module:
        if not trainset:
            raise ValueError("trainset cannot be empty")
        valset = valset or trainset
        if isinstance(teacher, list):  # dspy's BetterTogether wraps the teacher in a list
            teacher = teacher[0] if teacher else None
        names = [name for name, _ in student.named_predictors()]
        traces = self._teacher_traces(student, teacher, trainset)
        candidates = [(seed, self._candidate(student, seed, trainset, traces, names))
                      for seed in range(-3, self.num_candidate_programs)]
        scores = evaluate_many([c for _, c in candidates], valset, self.metric, num_threads=self.num_threads,
                               desc="prompt candidates")
        ranked = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))  # ties keep the earlier
        for i in range(len(candidates)):
            logger.info("candidate seed %d: %.1f", candidates[i][0], scores[i])
        best = candidates[ranked[0]][1]
        best.candidate_programs = [Candidate(candidates[i][1], scores[i], str(candidates[i][0])) for i in ranked]
        return best

    def _teacher_traces(self, student, teacher, trainset) -> list[Trace]:
        if teacher is None:
            teacher = _copy_without_demos(student)
            if self.max_labeled_demos:
                for pred in teacher.predictors():
                    pred.demos = random.Random(0).sample(trainset, min(self.max_labeled_demos, len(trainset)))
        result = bootstrap(teacher, trainset, self.metric, num_threads=self.num_threads, desc="bootstrap demos")
        return result.traces

    def _candidate(self, student, seed: int, trainset: list, traces: list[Trace], names: list[str]) -> dspy.Module:
        program = _copy_without_demos(student)
        if seed == -3:
            return program
        if seed == -2:
            labeled = random.Random(0).sample(trainset, min(self.max_labeled_demos, len(trainset)))
            for pred in program.predictors():
                pred.demos = list(labeled)
            return program
        order = list(range(len(trainset)))
        size = self.max_bootstrapped_demos
        if seed >= 0:
            rng = random.Random(self.seed + seed)
            rng.shuffle(order)
            size = rng.randint(1, max(1, self.max_bootstrapped_demos))
        by_example = {t.example_index: t for t in traces}
        chosen = [by_example[i] for i in order if i in by_example][:size]
        used = {t.example_index for t in chosen}
        rest = [trainset[i] for i in order if i not in used]
        for name, pred in program.named_predictors():
            demos = [d for d in (as_demo(t, name) for t in chosen) if d is not None]
            room = max(0, self.max_labeled_demos - len(demos))
            pred.demos = demos + random.Random(0).sample(rest, min(room, len(rest)))
        return program


def _copy_without_demos(program: dspy.Module) -> dspy.Module:
    """A deep copy with no demos that keeps each predictor's LM (``reset_copy`` would drop it)."""
    copy = program.deepcopy()
    for pred in copy.predictors():
        pred.demos = []
    return copy
