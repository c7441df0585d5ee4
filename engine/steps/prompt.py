"""``PromptStep``: the paper's prompt optimizer (BootstrapFewShotWithRandomSearch), in parallel.

Same candidates as dspy 3.4.1's BFRS (``test_bfrs_parity`` compares them seed by seed): seed -3
zero-shot; -2 ``LabeledFewShot`` (``random.Random(0)`` samples ``max_labeled_demos`` of the
trainset, one RNG across predictors; ``labeled_sample=False`` takes the first ones); -1 the first
``max_bootstrapped_demos`` passing examples in trainset order; seed ``s >= 0`` shuffles the trainset
with ``random.Random(s)`` and takes the first ``random.Random(s).randint(1, max_bootstrapped_demos)``
passing ones in that order. Bootstrapped candidates are topped up to ``max_labeled_demos`` as
``BootstrapFewShot._train`` does: the examples not bootstrapped, in the candidate's order, shuffled
by ``random.Random(0)``, then sampled by one ``random.Random(0)`` across predictors.
The teacher is dspy's too: the student (or ``teacher=``) with ``LabeledFewShot`` demos unless it is
``_compiled``, and an example never among its own demos while it bootstraps.

Differences, which matter at scale: the teacher runs over the whole trainset once, concurrently,
and each candidate draws its demos from those traces (its bootstrapped demos are the first passing
examples in its order). That is dspy's result whenever the teacher's answer for an example does
not depend on which *other* labelled demos it sees: dspy re-samples the teacher's demos from each
candidate's shuffled trainset, here every candidate uses seed -1's teacher. ``max_rounds`` is 1
(dspy's default). All candidates x valset run concurrently; candidates and the teacher keep the
program's LMs (dspy's ``reset_copy`` drops them for ``settings.lm``), so after fine-tuning the
adapter scores them. Ties keep the earlier candidate. ``seed`` (the run's) shifts the random
candidates: seed ``s`` shuffles with ``random.Random(s + 1_000_000 * seed)``, so ``seed=0`` is stock
dspy and other run seeds draw other candidates; -3/-2/-1 and the ``Random(0)`` samples stay dspy's.
Does not know Ray: calls go through the program's LM.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from engine.steps.bootstrap import Trace, as_demo, bootstrap, copy_without_demos, labeled, teacher_on
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
        seed: the run's seed; candidate ``s >= 0`` shuffles with ``random.Random(s + 1_000_000 * seed)``
            (``shuffle_seed``), so 0 gives stock dspy's candidates.
        teacher_lm: when ``compile`` gets no ``teacher``, the student's program on this LM bootstraps the
            demos (e.g. a larger model of the run's ``models:``); default the student itself.

    Example:
        >>> step = PromptStep(metric, num_candidate_programs=6)  # doctest: +SKIP
        >>> best = step.compile(program, trainset=train, valset=val)  # doctest: +SKIP
    """

    def __init__(self, metric: Callable, num_candidate_programs: int = 6, max_bootstrapped_demos: int = 3,
                 max_labeled_demos: int = 3, num_threads: int = 16, seed: int = 0, teacher_lm: dspy.LM | None = None):
        if num_candidate_programs < 0 or max_bootstrapped_demos < 0 or max_labeled_demos < 0:
            raise ValueError("candidate and demo counts must be >= 0")
        self.metric = metric
        self.num_candidate_programs = num_candidate_programs
        self.max_bootstrapped_demos = max_bootstrapped_demos
        self.max_labeled_demos = max_labeled_demos
        self.num_threads = num_threads
        self.seed = seed
        self.teacher_lm = teacher_lm

    def compile(self, student: dspy.Module, *, trainset: list, teacher=None, valset: list | None = None,
                restrict=None, labeled_sample: bool = True) -> dspy.Module:
        """Build, score and rank the candidates; return the best with ``candidate_programs`` (best first).

        Args:
            student: the program; its predictors' LMs run the candidates.
            trainset: examples to bootstrap and sample demos from.
            teacher: runs the bootstrapping (default the student); a list holds one (dspy's BetterTogether).
            valset: examples that score the candidates (default the trainset, as dspy).
            restrict: only these candidate seeds (dspy's ``restrict``).
            labeled_sample: seed -2 samples its labelled demos; False takes the first ones (dspy's).

        Raises:
            ValueError: empty trainset, or ``restrict`` leaves no candidate.
        """
        if not trainset:
            raise ValueError("trainset cannot be empty")
        valset = valset or trainset
        if isinstance(teacher, list):  # dspy's BetterTogether wraps the teacher in a list
            teacher = teacher[0] if teacher else None
        if teacher is None and self.teacher_lm is not None:
            teacher = teacher_on(student, self.teacher_lm)
        seeds = list(range(-3, self.num_candidate_programs))
        if restrict is not None:
            restrict = set(restrict)
            if not restrict.intersection(seeds):
                raise ValueError(f"`restrict` {restrict!r} does not match any candidate seed in "
                                 f"range(-3, {self.num_candidate_programs}); no candidate programs would be evaluated.")
            seeds = [s for s in seeds if s in restrict]
        traces = self.teacher_traces(student, teacher, trainset) if max(seeds) >= -1 else []
        candidates = [(seed, self.candidate(student, seed, trainset, traces, labeled_sample)) for seed in seeds]
        scores = evaluate_many([c for _, c in candidates], valset, self.metric, num_threads=self.num_threads,
                               desc="prompt candidates")
        ranked = sorted(range(len(candidates)), key=lambda i: (-scores[i], i))  # ties keep the earlier
        logger.info("prompt candidates (seed: valset score): %s; best seed %d",
                    ", ".join(f"{seed}: {score:.1f}" for (seed, _), score in zip(candidates, scores)),
                    candidates[ranked[0]][0])
        best = candidates[ranked[0]][1]
        best.candidate_programs = [Candidate(candidates[i][1], scores[i], str(candidates[i][0])) for i in ranked]
        return best

    def shuffle_seed(self, seed: int) -> int:
        """The ``random.Random`` seed of candidate ``seed >= 0``: dspy's own when ``self.seed`` is 0."""
        return seed + 1_000_000 * self.seed

    def teacher_traces(self, student, teacher, trainset) -> list[Trace]:
        """The teacher's (default the student's) passing traces over ``trainset``, every example at once."""
        teacher = (teacher if teacher is not None else student).deepcopy()
        if self.max_labeled_demos and not getattr(teacher, "_compiled", False):  # dspy's BootstrapFewShot
            teacher = labeled(teacher, trainset, self.max_labeled_demos, sample=True)
        result = bootstrap(teacher, trainset, self.metric, num_threads=self.num_threads, desc="bootstrap demos",
                           exclude_own_demo=True)
        return result.traces

    def candidate(self, student, seed: int, trainset: list, traces: list[Trace],
                  labeled_sample: bool = True) -> dspy.Module:
        """Candidate ``seed``'s program (module docstring), its demos drawn from ``traces``."""
        if seed == -3:
            return copy_without_demos(student)
        if seed == -2:
            return labeled(student, trainset, self.max_labeled_demos, sample=labeled_sample)
        order = list(range(len(trainset)))  # the candidate's trainset, as indices
        size = self.max_bootstrapped_demos
        if seed >= 0:
            random.Random(self.shuffle_seed(seed)).shuffle(order)
            size = random.Random(self.shuffle_seed(seed)).randint(1, size) if size else 0
        passing = {t.example_index: t for t in traces}
        chosen = [passing[i] for i in order if i in passing][:size]
        used = {t.example_index for t in chosen}
        raw = [trainset[i] for i in order if i not in used]  # BootstrapFewShot's ``validation``
        random.Random(0).shuffle(raw)
        rng = random.Random(0)
        program = copy_without_demos(student)
        for name, pred in program.named_predictors():
            demos = [d for d in (as_demo(t, name) for t in chosen) if d is not None][:size]
            pred.demos = demos + rng.sample(raw, max(0, min(self.max_labeled_demos - len(demos), len(raw))))
        program._compiled = True  # as BootstrapFewShot marks its result
        return program
