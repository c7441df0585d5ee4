"""``GEPAStep``: dspy's GEPA (reflective prompt evolution) as a step kind, on the pool.

What it adds to stock ``dspy.GEPA`` (which it runs unmodified):

- a program's ordinary 3-argument metric works: ``feedback_metric`` turns it into GEPA's 5-argument
  feedback metric (the score, and a feedback text naming the expected and the produced outputs); a
  program module may export its own ``feedback(gold, pred) -> str`` for richer text;
- the reflection LM defaults to the program's own LM (a copy sampling at temperature 1.0, as
  dspy's docs run it, with room for an instruction: at least ``INSTRUCTION_MAX_TOKENS``), or is
  whatever LM the caller gives (``reflection_lm=``); dspy's proposer asks it through JSONAdapter, which
  the pool decodes under the JSON schema, so a small model's proposal parses;
- rollouts are sized to the pool: GEPA's evaluations (minibatches, the valset, merges) run on
  ``num_threads`` concurrent program runs (the run's ``threads``, 32 by default, not dspy's 8);
- a killed step resumes: GEPA's state lives in the step's state dir (``log_dir``, kept across
  attempts by the run store, moved into the committed step folder), and gepa resumes from it.

Budget: exactly one of ``auto`` ('light' by default), ``max_metric_calls``, ``max_full_evals`` (GEPA's
rule). ``proposals: n`` > 1 turns on gepa 0.1.4's parallel proposals (``IndependentSampling(n)``: n
(parent, minibatch) proposal tasks per iteration, their rollouts and reflections run concurrently, where
classic GEPA has one parent and one 3-example minibatch in flight): the search explores n branches per
iteration, so the same metric-call budget runs out in fewer, wider iterations — more rollouts in flight
for the pool, but a child no longer builds on the children proposed beside it. ``gepa_kwargs`` go to
``gepa.optimize`` unchanged. gepa 0.1.4 would run an iteration's n reflections one after another under dspy's
adapter; the step runs them at once (``concurrent_reflections``). Does not know run dirs beyond the
``state_dir`` it is given, or pools.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from engine.steps.options import check_options, with_room

logger = logging.getLogger(__name__)

REFLECTION_TEMPERATURE = 1.0


def feedback_metric(metric: Callable, feedback: Callable | None = None) -> Callable:
    """GEPA's 5-argument feedback metric from a 3-argument ``metric(gold, pred, trace=None)``.

    Args:
        metric: the program's metric; its value becomes the score (``True`` -> 1.0).
        feedback: optional ``feedback(gold, pred) -> str`` (a program module's own); default a text
            naming the expected outputs and what the program produced.

    Returns:
        ``f(gold, pred, trace=None, pred_name=None, pred_trace=None) -> dspy.Prediction(score, feedback)``.

    Example:
        >>> f = feedback_metric(lambda gold, pred, trace=None: gold.answer == pred.answer)
        >>> f(dspy.Example(answer="4"), dspy.Prediction(answer="5")).score
        0.0
    """
    def gepa_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        score = float(metric(gold, pred, trace))
        text = feedback(gold, pred) if feedback is not None else default_feedback(gold, pred, score)
        return dspy.Prediction(score=score, feedback=text)

    return gepa_metric


def default_feedback(gold: dspy.Example, pred: Any, score: float) -> str:
    """'Correct.' or 'Incorrect.', then the expected labels and the produced outputs, field by field."""
    labels = dict(gold.labels().items()) if gold._input_keys else dict(gold.items())
    produced = dict(pred.items()) if hasattr(pred, "items") else {}
    shown = ", ".join(f"{k}={_short(produced.get(k))}" for k in labels) or _short(produced)
    expected = ", ".join(f"{k}={_short(v)}" for k, v in labels.items())
    verdict = "Correct." if score >= 1.0 else "Partly correct." if score > 0 else "Incorrect."
    return f"{verdict} Expected {expected}; the program produced {shown}."


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value) if not isinstance(value, str) else repr(value.strip())
    return text if len(text) <= limit else text[:limit] + "…"


class GEPAStep(Teleprompter):
    """Run ``dspy.GEPA`` as a BetterTogether step (see the module docstring).

    Args:
        metric: the program's 3-argument metric.
        feedback: optional ``feedback(gold, pred) -> str``.
        reflection_lm: the LM that proposes instructions; default the program's LM at temperature 1.0.
        num_threads: concurrent program runs for GEPA's evaluations (size it to the pool).
        auto, max_metric_calls, max_full_evals: GEPA's budget (exactly one; default ``auto='light'``).
        proposals: proposal tasks per iteration (1: classic GEPA; n > 1: gepa's ``IndependentSampling(n)``).
        seed: GEPA's seed.
        **gepa_options: more ``dspy.GEPA`` arguments (``reflection_minibatch_size``, ``use_merge``,
            ``gepa_kwargs`` …).

    Example:
        >>> step = GEPAStep(iris.metric, max_metric_calls=200, num_threads=32)  # doctest: +SKIP
        >>> tuned = step.compile(program, trainset=train, valset=val, state_dir="runs/x/01_gepa.state")  # doctest: +SKIP
    """

    def __init__(self, metric: Callable, *, feedback: Callable | None = None, reflection_lm: dspy.LM | None = None,
                 num_threads: int = 32, auto: str | None = None, max_metric_calls: int | None = None,
                 max_full_evals: int | None = None, proposals: int = 1, seed: int = 0, **gepa_options: Any):
        budgets = [b for b in (auto, max_metric_calls, max_full_evals) if b is not None]
        if len(budgets) > 1:
            raise ValueError("give GEPA one budget: auto, max_metric_calls or max_full_evals")
        if proposals < 1:
            raise ValueError(f"proposals must be >= 1, got {proposals}")
        if proposals > 1:
            from gepa.strategies.proposal_sampling import IndependentSampling

            gepa_options["gepa_kwargs"] = {"sampling_strategy": IndependentSampling(proposals),
                                           **(gepa_options.get("gepa_kwargs") or {})}
        self.proposals = proposals
        self.metric = metric
        self.feedback = feedback
        self.reflection_lm = reflection_lm
        self.num_threads = num_threads
        self.budget = ({"auto": auto} if auto else {"max_metric_calls": max_metric_calls} if max_metric_calls
                       else {"max_full_evals": max_full_evals} if max_full_evals else {"auto": "light"})
        self.seed = seed
        self.gepa_options = gepa_options
        self.last_run: dict = {}
        check_options(dspy.GEPA.__init__, gepa_options, ours={"metric"}, name="GEPA")

    def compile(self, student: dspy.Module, *, trainset: list, valset: list | None = None,
                state_dir: str | Path | None = None, **_: Any) -> dspy.Module:
        """GEPA on ``student``: reflective updates on ``trainset``, Pareto tracking on ``valset``.

        Raises:
            ValueError: the program's predictors share no LM and no ``reflection_lm`` was given.
        """
        reflection = self.reflection_lm or reflection_of(student)
        log_dir = str(state_dir) if state_dir else None
        if log_dir and any(Path(log_dir).iterdir()):
            logger.info("GEPA resumes from its saved state in %s", log_dir)
        optimizer = dspy.GEPA(metric=feedback_metric(self.metric, self.feedback), reflection_lm=reflection,
                              num_threads=self.num_threads, log_dir=log_dir, seed=self.seed, track_stats=True,
                              **self.budget, **self.gepa_options)
        with concurrent_reflections() if self.proposals > 1 else contextlib.nullcontext():
            result = optimizer.compile(student, trainset=trainset, valset=valset or None)
        details = getattr(result, "detailed_results", None)
        self.last_run = {"gepa": {"metric_calls": getattr(details, "total_metric_calls", None),
                                  "candidates": len(getattr(details, "candidates", []) or []),
                                  "budget": self.budget, "proposals": self.proposals}}
        return result


def reflection_of(program: dspy.Module) -> dspy.LM:
    """The program's LM, sampling at ``REFLECTION_TEMPERATURE`` with at least ``INSTRUCTION_MAX_TOKENS``
    (its predictors must share one LM)."""
    lms = {id(p.lm): p.lm for p in program.predictors() if p.lm is not None}
    if len(lms) != 1:
        raise ValueError("GEPA's reflection LM defaults to the program's LM, but its predictors use "
                         f"{len(lms)} LMs; give reflection_lm= (or reflection_model: in the run config)")
    (lm,) = lms.values()
    return as_reflection(lm)


def as_reflection(lm: dspy.LM) -> dspy.LM:
    """``lm`` sampling at ``REFLECTION_TEMPERATURE`` with at least ``INSTRUCTION_MAX_TOKENS``."""
    return with_room(lm, temperature=REFLECTION_TEMPERATURE)


_patch_lock, _patch_users = threading.Lock(), [0]


@contextlib.contextmanager
def concurrent_reflections() -> Iterator[None]:
    """Inside, gepa runs an iteration's reflections at once, each in a copy of the caller's context.

    gepa 0.1.4 (``ReflectiveMutationProposer._propose_texts_batch``) calls the proposer once per proposal task,
    one after another, whenever the adapter proposes (dspy's ``DspyAdapter`` does): with ``proposals: n`` an
    iteration's n rollouts ran at once but its n reflection calls in a row. Here they run in n threads (dspy's
    settings are context variables: each thread gets the caller's LM, adapter and usage meter); results keep the
    tasks' order and a failed reflection raises as before (gepa then retries the tasks one by one). The patch is
    on gepa's class while any caller is inside (a stock ``dspy.GEPA`` run beside it would get it too).
    """
    from gepa.proposer.reflective_mutation.reflective_mutation import ReflectiveMutationProposer as proposer

    with _patch_lock:
        if _patch_users[0] == 0:
            serial = proposer._propose_texts_batch

            def at_once(self, jobs):
                if len(jobs) < 2 or (self.adapter.propose_new_texts is None and self.custom_candidate_proposer is None):
                    return serial(self, jobs)  # a single task, or gepa's own batched reflection LM
                with ThreadPoolExecutor(len(jobs), thread_name_prefix="gepa-reflect") as pool:
                    futures = [pool.submit(contextvars.copy_context().run, self.propose_new_texts, *job) for job in jobs]
                    return [f.result() for f in futures]

            at_once.serial = serial
            proposer._propose_texts_batch = at_once
        _patch_users[0] += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_users[0] -= 1
            if _patch_users[0] == 0:
                proposer._propose_texts_batch = proposer._propose_texts_batch.serial
