"""Trace bootstrapping: run a program over examples in parallel and keep what passes the metric.

Knows: which predictor made each call of a trace, that only runs whose metric passes are kept
(a parse failure never passes; other errors count against ``max_errors``, see
``engine.evaluate``), and how a passing trace becomes few-shot demos (for the prompt step) or
chat fine-tuning rows with the *vanilla* prompt, no demos (for the weight step, as in the paper).
Does not know Ray or training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import dspy

from engine.evaluate import run_all

logger = logging.getLogger(__name__)


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
    failed_calls: int = 0
    errors: list[str] = field(default_factory=list)


def bootstrap(program: dspy.Module, examples: Sequence[dspy.Example], metric: Callable, *,
              num_threads: int = 16, desc: str = "bootstrap") -> BootstrapResult:
    """Run ``program`` on every example at once and keep the traces whose metric passes.

    Raises:
        engine.evaluate.TooManyErrors: ``max_errors`` runs failed with something other than a parse failure.
    """
    names = {id(pred): name for name, pred in program.named_predictors()}
    runs = run_all([(program, ex) for ex in examples], metric, num_threads=num_threads, trace=True, desc=desc)
    traces = []
    for run in runs:
        if run.error or not run.score:
            continue
        calls = tuple((names[id(pred)], dict(inputs), dict(outputs.items()))
                      for pred, inputs, outputs in run.trace if id(pred) in names)
        traces.append(Trace(run.example_index, examples[run.example_index], calls))
    errors = [r.error for r in runs if r.error]
    logger.info("%s: %d of %d examples passed (%d failed to run)", desc, len(traces), len(runs), len(errors))
    return BootstrapResult(traces, len(runs), len(errors), errors[:5])


def chat_rows(program: dspy.Module, traces: Sequence[Trace], adapter: dspy.Adapter | None = None) -> list[dict]:
    """Fine-tuning rows ``{"predictor", "example_index", "messages"}``: each call's vanilla prompt + its output."""
    adapter = adapter or dspy.settings.adapter or dspy.ChatAdapter()
    predictors = dict(program.named_predictors())
    rows = []
    for trace in traces:
        for name, inputs, outputs in trace.calls:
            signature = predictors[name].signature
            data = adapter.format_finetune_data(signature=signature, demos=[], inputs=inputs, outputs=outputs)
            rows.append({"predictor": name, "example_index": trace.example_index, "messages": data["messages"]})
    return rows


def as_demo(trace: Trace, name: str) -> dspy.Example | None:
    """The demo a trace gives predictor ``name`` (its first call), augmented like dspy's."""
    for pred_name, inputs, outputs in trace.calls:
        if pred_name == name:
            return dspy.Example(augmented=True, **inputs, **outputs)
    return None
