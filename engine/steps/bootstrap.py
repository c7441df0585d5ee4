"""Trace bootstrapping: run a program over examples in parallel and keep what passes the metric.

Knows: which predictor made each call of a trace, that only runs whose metric passes are kept
(a parse failure never passes; other errors count against ``max_errors``, see
``engine.evaluate``), and how a passing trace becomes few-shot demos (for the prompt step) or
chat fine-tuning rows with the *vanilla* prompt, no demos (for the weight step, as in the paper).
With ``exclude_own_demo`` an example never sees itself among the program's demos (dspy's
BootstrapFewShot), still in one concurrent ``run_all``. Does not know Ray or training.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import dspy
from dspy.utils.hasher import Hasher

from engine.evaluate import run_all

logger = logging.getLogger(__name__)


def teacher_on(student: dspy.Module, lm: dspy.LM) -> dspy.Module:
    """The student's program (its prompts and demos) with every predictor on ``lm``: a teacher on another
    model whose traces map to the student's predictors by name."""
    teacher = student.deepcopy()
    for pred in teacher.predictors():
        pred.lm = lm
    return teacher


@dataclass(frozen=True)
class Trace:
    """A passing run: the example and, per predictor call, (predictor name, inputs, outputs)."""

    example_index: int
    example: dspy.Example
    calls: tuple[tuple[str, dict, dict], ...]


@dataclass(frozen=True)
class BootstrapResult:
    """Passing traces plus the counts that explain them."""

    traces: list[Trace]
    attempted: int
    failed_calls: int = 0  # runs that did not parse or broke
    errors: list[str] = field(default_factory=list)  # the first messages of those
    parse_failures: int = 0  # of ``failed_calls``, the answers that did not parse (wrong answers)

    @property
    def broken(self) -> int:
        """Runs that failed with an error (the LM, the pool, the program or metric broke), not a wrong answer."""
        return self.failed_calls - self.parse_failures


def bootstrap(program: dspy.Module, examples: Sequence[dspy.Example], metric: Callable, *,
              num_threads: int = 16, desc: str = "bootstrap", exclude_own_demo: bool = False,
              max_rounds: int = 1) -> BootstrapResult:
    """Run ``program`` on every example at once and keep the traces whose metric passes.

    With ``max_rounds`` > 1, the examples that have not passed yet are run again, up to
    ``max_rounds`` runs each, as dspy's ``BootstrapFewShot(max_rounds=...)`` does: round ``r`` > 0
    samples at temperature 1.0 with ``rollout_id=r`` (a fresh cache entry) and ``seed=r`` (the same
    samples on a rerun). dspy swaps only ``dspy.settings.lm``; here every predictor's own LM is
    swapped too, since a Tandem program's predictors carry their pool's LM.

    Args:
        program: the program to run (its predictors name the trace's calls).
        examples: the examples to run it on.
        metric: ``metric(example, prediction, trace)``; a truthy value passes.
        num_threads: concurrent runs.
        desc: label for logs.
        exclude_own_demo: run an example that is among ``program``'s demos with a copy whose demos
            leave it out (``demo != example``, as dspy's ``_bootstrap_one_example``), so no example
            sees its own answer; the other examples share ``program``.
        max_rounds: runs per example at most (1: greedy once, the paper's BootstrapFinetune).

    Raises:
        engine.evaluate.TooManyErrors: ``max_errors`` runs failed with something other than a parse failure.
        ValueError: ``max_rounds`` < 1.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    passed: dict[int, Trace] = {}
    errors: list[str] = []
    parse_failures = 0
    todo = list(range(len(examples)))
    for round_idx in range(max_rounds):
        source = program if round_idx == 0 else _sampling(program, round_idx)
        programs = [_without_demo(source, examples[i]) if exclude_own_demo else source for i in todo]
        label = desc if round_idx == 0 else f"{desc} (round {round_idx + 1})"
        runs = run_all(list(zip(programs, [examples[i] for i in todo])), metric, num_threads=num_threads,
                       trace=True, desc=label)
        for run in runs:
            index = todo[run.example_index]
            if run.error:
                errors.append(run.error)
                parse_failures += run.parse_failure
            elif run.score:  # run.trace: (predictor name, inputs, outputs) per call
                passed[index] = Trace(index, examples[index], run.trace)
        todo = [i for i in todo if i not in passed]
        if not todo:
            break
    traces = [passed[i] for i in sorted(passed)]
    rounds = f" in up to {max_rounds} rounds" if max_rounds > 1 else ""
    logger.info("%s: %d of %d examples passed%s (%d runs did not parse, %d failed with an error)", desc, len(traces),
                len(examples), rounds, parse_failures, len(errors) - parse_failures)
    return BootstrapResult(traces, len(examples), len(errors), errors[:5], parse_failures)


def _sampling(program: dspy.Module, round_idx: int) -> dspy.Module:
    """A copy of ``program`` whose LMs sample (temperature 1.0) a fresh, seeded rollout ``round_idx``."""
    copy = program.deepcopy()
    sample = {"rollout_id": round_idx, "temperature": 1.0, "seed": round_idx}
    for pred in copy.predictors():
        lm = pred.lm or dspy.settings.lm
        if lm is None:
            raise ValueError("bootstrapping rounds need an LM: set one on the predictors or with dspy.configure")
        pred.lm = lm.copy(**sample)
    return copy


def _without_demo(program: dspy.Module, example: dspy.Example) -> dspy.Module:
    """``program`` itself, or a copy without ``example`` among its demos when it is one of them."""
    if not any(demo == example for pred in program.predictors() for demo in pred.demos):
        return program
    copy = program.deepcopy()
    for pred in copy.predictors():
        pred.demos = [demo for demo in pred.demos if demo != example]
    return copy


def chat_rows(program: dspy.Module, traces: Sequence[Trace], adapter: dspy.Adapter | None = None,
              with_demos: bool = False) -> list[dict]:
    """Fine-tuning rows ``{"predictor", "example_index", "messages"}``: each call's prompt + its output.

    The prompt is the vanilla one (no demos, the paper's) unless ``with_demos``: then it carries
    ``program``'s demos of that predictor, as dspy's BootstrapFinetune without ``exclude_demos``.
    """
    adapter = adapter or dspy.settings.adapter or dspy.ChatAdapter()
    predictors = dict(program.named_predictors())
    rows = []
    for trace in traces:
        for name, inputs, outputs in trace.calls:
            pred = predictors[name]
            data = adapter.format_finetune_data(signature=pred.signature, demos=pred.demos if with_demos else [],
                                                inputs=inputs, outputs=outputs)
            rows.append({"predictor": name, "example_index": trace.example_index, "messages": data["messages"]})
    return rows


def as_demo(trace: Trace, name: str) -> dspy.Example | None:
    """The demo a trace gives predictor ``name``, augmented, chosen as dspy's BootstrapFewShot does.

    One call: its demo. Several calls of the same predictor: dspy's choice, seeded by the demos'
    hash (50/50 between one of the first N-1, drawn at random, and the last).
    """
    demos = [dspy.Example(augmented=True, **inputs, **outputs) for pred_name, inputs, outputs in trace.calls
             if pred_name == name]
    if len(demos) > 1:
        rng = random.Random(Hasher.hash(tuple(demos)))
        return rng.choice(demos[:-1]) if rng.random() < 0.5 else demos[-1]
    return demos[0] if demos else None


def labeled(program: dspy.Module, trainset: list, k: int, *, sample: bool) -> dspy.Module:
    """dspy's ``LabeledFewShot(k)``: one ``random.Random(0)`` samples ``k`` demos per predictor; LMs kept."""
    copy = copy_without_demos(program)
    rng = random.Random(0)
    for pred in copy.predictors():
        pred.demos = rng.sample(trainset, min(k, len(trainset))) if sample else list(trainset[:k])
    return copy


def copy_without_demos(program: dspy.Module) -> dspy.Module:
    """A deep copy with no demos that keeps each predictor's LM (``reset_copy`` would drop it)."""
    copy = program.deepcopy()
    for pred in copy.predictors():
        pred.demos = []
    return copy
