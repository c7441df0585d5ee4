"""``BetterTogether``: run prompt (``p``) and weight (``w``) steps in a strategy order, keep the best.

API-compatible with dspy 3.4.1's ``dspy.BetterTogether`` (same constructor, ``compile`` arguments,
validation and error meanings, ``candidate_programs`` best first with earlier winning ties,
``flag_compilation_error_occurred``), with its defects fixed: the fine-tuned LM scores the next
prompt step's candidates, parse failures score 0 instead of aborting (other errors count against
``max_errors``), ``teacher=`` works with the default prompt step, evaluation is concurrent, a
too-small trainset does not silently leave an empty valset. Defaults: ``p`` = ``PromptStep``
(parallel BFRS), ``w`` = ``WeightStep`` (bootstrap -> Parquet -> Ray Train LoRA). Any dspy
Teleprompter can be a step, dspy's own included (``BootstrapFewShotWithRandomSearch``,
``LabeledFewShot``, ``MIPROv2``…): each step gets a copy of the program marked uncompiled (as dspy
does), runs with ``settings.lm`` set to the program's LM when all its predictors share one (so
optimizers that ``reset_copy`` score with the current, possibly fine-tuned LM), and LMs an optimizer
dropped are given back; ``candidate_programs`` of dicts (``{"program", "score", "seed"}``) are
recorded like Tandem's. With ``run_dir=`` every completed step is stored and a rerun skips it
(``engine.store.run_store``).
Does not launch or kill pools: the caller owns the pool's lifetime.
"""

from __future__ import annotations

import inspect
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from actors.dspy_side import usage
from actors.errors import own_exception

from engine import strategy as strategies
from engine.evaluate import collect_errors, percent, run_grid
from engine.steps.prompt import Candidate, PromptStep
from engine.store.run_store import AdapterRef, RunStore
from engine.steps.weight import WeightStep, pool_of

logger = logging.getLogger(__name__)


class BetterTogether(Teleprompter):
    """Alternate prompt and weight optimization by a strategy string.

    Args:
        metric: ``metric(example, prediction, trace=None)``; higher is better.
        **optimizers: step key -> Teleprompter; default ``p=PromptStep(metric)``, ``w=WeightStep(metric)``.

    Example:
        >>> program.set_lm(pool_lm(pool))  # doctest: +SKIP
        >>> best = BetterTogether(metric).compile(program, trainset=train, valset=val, strategy="p -> w -> p")  # doctest: +SKIP
        >>> best.candidate_programs[0].score  # doctest: +SKIP
    """

    def __init__(self, metric: Callable, **optimizers: Teleprompter):
        self.metric = metric
        optimizers = optimizers or {"p": PromptStep(metric), "w": WeightStep(metric)}
        for key, optimizer in optimizers.items():
            if not isinstance(optimizer, Teleprompter):
                raise TypeError(f"Optimizer '{key}' must be a Teleprompter, got {type(optimizer).__name__}")
        self.optimizers = optimizers

    def compile(self, student: dspy.Module, *, trainset: list, teacher=None, valset: list | None = None,
                num_threads: int | None = None, max_errors: int | None = None,
                provide_traceback: bool | None = None, seed: int | None = None,
                valset_ratio: float = 0.1, shuffle_trainset_between_steps: bool = True,
                strategy: str = "p -> w -> p", optimizer_compile_args: dict[str, dict[str, Any]] | None = None,
                run_dir: str | None = None, fingerprint: dict | None = None,
                around_step: Callable[[int, str], ContextManager] | None = None) -> dspy.Module:
        """Run the strategy; return the best program on the valset (the latest without a valset).

        ``max_errors`` (default ``dspy.settings.max_errors``, as in dspy): a parse failure scores 0;
        any other exception while a step runs its program or metric is an error, and a step with
        ``max_errors`` errors fails (is not committed) with the first error named. Fewer errors
        are recorded in the step's ``step.json`` (``extra.errors``).
        ``provide_traceback`` (dspy's): set as ``settings.provide_traceback`` while steps run (dspy's
        own evaluators inside a step honour it), and a failed step's traceback is logged.
        ``run_dir`` stores each completed step and resumes from them; ``fingerprint`` is what must
        match for a resume (model, program, settings).
        ``around_step(index, key)``: a context manager each step that runs (not one restored from
        ``run_dir``) runs inside, e.g. ``engine.groups.ModelGroups.around`` (a teacher up for its steps only).

        Raises:
            ValueError: empty trainset, valset_ratio outside [0, 1) or leaving an empty valset, empty
                strategy or unknown keys, invalid compile args, predictors without an LM.
            TypeError: ``student`` in ``optimizer_compile_args``.
        """
        steps = strategies.parse(strategy, self.optimizers)
        trainset, valset = _split(trainset, valset, valset_ratio)
        compile_args = self._check_compile_args(optimizer_compile_args or {})
        missing = [name for name, pred in student.named_predictors() if pred.lm is None]
        if missing:
            raise ValueError(f"predictors {missing} have no LM; call program.set_lm(lm) before compile "
                             "(steps need an explicit LM, as in dspy)")
        if isinstance(teacher, list):
            teacher = teacher[0] if teacher else None
        store = RunStore(run_dir, {"strategy": strategy, "seed": seed, **(fingerprint or {})}) if run_dir else None
        threads = num_threads or 16
        rng = random.Random(seed)
        candidates: list[Candidate] = []
        failed, error = False, None
        limits = {} if max_errors is None else {"max_errors": max_errors}
        if provide_traceback is not None:
            limits["provide_traceback"] = provide_traceback
        with dspy.context(**limits):
            program = self._step(store, 0, "", "", student, lambda: student, valset, threads, candidates)
            for index, key in enumerate(steps, start=1):
                if shuffle_trainset_between_steps:
                    rng.shuffle(trainset)
                prefix = strategies.prefix(steps, index)
                run = self._runner(key, program, trainset, valset, teacher, compile_args.get(key, {}), store, index)
                if around_step is not None:
                    run = _inside(around_step, index, key, run)
                try:
                    program = self._step(store, index, key, prefix, student, run, valset, threads, candidates)
                except Exception as exc:
                    inner = own_exception(exc)  # a Ray task error's str is the whole remote traceback
                    failed, error = True, f"step '{prefix}' failed: {type(inner).__name__}: {inner}"
                    logger.error("step %d/%d (%s) failed: %s: %s; returning the best program so far", index,
                                 len(steps), prefix, type(exc).__name__, exc, exc_info=bool(provide_traceback))
                    break
        ranked = sorted(range(len(candidates)), key=lambda i: (
            -(candidates[i].score if candidates[i].score is not None else float("-inf")), i))
        best = candidates[ranked[0]] if valset else candidates[-1]
        result = best.program.deepcopy()
        result.candidate_programs = [candidates[i] for i in ranked]
        result.flag_compilation_error_occurred = failed
        result.compilation_error = error  # what stopped the strategy early (None when every step ran)
        result.best_strategy = best.strategy
        result._compiled = True  # as dspy marks its result
        return result

    def _runner(self, key, program, trainset, valset, teacher, args, store, index) -> Callable[[], dspy.Module]:
        optimizer = self.optimizers[key]

        def run() -> dspy.Module:
            lms = [pred.lm for pred in program.predictors()]
            offered = {"trainset": list(trainset), "valset": valset, "teacher": teacher, **args}
            accepted = inspect.signature(optimizer.compile).parameters
            takes_all = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
            if "step_dir" in accepted:  # Tandem's weight step: where this run of it keeps its files
                offered.update(step_dir=store.begin(index, key) if store else None, step_index=index,
                               adapter_root=store.adapters if store else None)
            if "state_dir" in accepted:  # a step that resumes a killed attempt (GEPA): kept across attempts
                offered.update(state_dir=store.state_dir(index, key) if store else None)
            student_copy = program.deepcopy()
            student_copy.__dict__.pop("candidate_programs", None)  # the last prompt step's, not this step's
            student_copy._compiled = False  # as dspy: BootstrapFewShot refuses a compiled student
            shared = {id(lm): lm for lm in lms}
            settings = {"lm": lms[0]} if len(shared) == 1 and lms[0] is not None else {}
            with dspy.context(**settings):  # optimizers that reset_copy run on settings.lm: the program's
                new = optimizer.compile(student_copy, **{k: v for k, v in offered.items()
                                                         if takes_all or k in accepted})
            for pred, lm in zip(new.predictors(), lms):  # optimizers that reset LMs get them back
                pred.lm = pred.lm or lm
            return new

        return run

    def _step(self, store, index, key, prefix, student, run, valset, threads, candidates) -> dspy.Module:
        record = store.completed(index, key) if store else None
        if record is not None:
            program = self._restore(store, record, student)
            logger.info("step %s (%s): done in an earlier run, score %s", store.name(index, key), prefix or
                        "baseline", record.score)
            candidates.append(Candidate(program, record.score, prefix))
            return program
        started, before = time.perf_counter(), usage.now()
        with collect_errors() as errors:
            program = run()
            score, completed = None, 0
            if valset:
                (runs,) = run_grid([program], valset, self.metric, num_threads=threads,
                                   desc=f"evaluate '{prefix or 'baseline'}'")
                score, completed = percent(runs), sum(not r.broke for r in runs)
        spent = usage.now() - before if before is not None else None
        logger.info("step '%s': score %s (%.0fs%s)", prefix or "baseline", score, time.perf_counter() - started,
                    f"; {spent.describe()}" if spent else "")
        candidates.append(Candidate(program, score, prefix))
        if store:
            extra = {"wall_s": round(time.perf_counter() - started, 1), "errors": errors.as_dict(),
                     "valset": {"n": len(valset or []), "completed": completed}}  # the score is over the completed
            if spent is not None:
                extra["costs"] = spent.as_dict()
            extra.update(getattr(self.optimizers.get(key), "last_run", None) or {})  # Tandem steps' own figures
            if hasattr(program, "candidate_programs"):
                extra["candidates"] = [_candidate_record(c) for c in program.candidate_programs]
            adapters = _adapters(program)
            store.commit(index, key, program=program, strategy=prefix, score=score, adapters=adapters, extra=extra)
        return program

    def _restore(self, store: RunStore, record, student: dspy.Module) -> dspy.Module:
        fresh = student.deepcopy()
        for pred in fresh.predictors():
            pred.demos = []
        program = store.load(record, fresh)
        bases = {name: pred.lm for name, pred in student.named_predictors()}
        for name, pred in program.named_predictors():
            pred.lm = bases[name].copy(model=record.models.get(name, bases[name].model))
        if record.adapters:
            pool = pool_of(program)
            served = set(pool.adapters())
            for adapter in record.adapters:
                if adapter.name not in served:
                    pool.load_adapter(adapter.name, str(adapter.path))
        return program

    def _check_compile_args(self, args: dict) -> dict:
        for key, kwargs in args.items():
            if key not in self.optimizers:
                raise ValueError(f"Invalid optimizer key '{key}'. Valid keys are: {list(self.optimizers)}")
            if "student" in kwargs:
                raise TypeError(f"optimizer_compile_args['{key}'] cannot contain 'student'; BetterTogether "
                                "passes the program itself")
            params = inspect.signature(self.optimizers[key].compile).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                invalid = set(kwargs) - set(params)
                if invalid:
                    raise ValueError(f"Invalid compile arguments for optimizer '{key}': {sorted(invalid)}. "
                                     f"{type(self.optimizers[key]).__name__}.compile() accepts: {list(params)}")
        return args


def _inside(around: Callable[[int, str], ContextManager], index: int, key: str,
            run: Callable[[], dspy.Module]) -> Callable[[], dspy.Module]:
    def inside() -> dspy.Module:
        with around(index, key):
            return run()

    return inside


def _split(trainset: list, valset: list | None, ratio: float) -> tuple[list, list | None]:
    if not trainset:
        raise ValueError("trainset cannot be empty")
    if ratio < 0 or ratio >= 1:
        raise ValueError(f"valset_ratio must be in range [0, 1), got {ratio}")
    trainset = list(trainset)
    if valset:
        return trainset, list(valset)
    if ratio == 0:
        return trainset, None
    n = int(ratio * len(trainset))
    if n == 0:
        raise ValueError(f"valset_ratio={ratio} of {len(trainset)} training examples leaves an empty valset; "
                         "pass valset=, raise valset_ratio, or set valset_ratio=0 to skip validation")
    return trainset[n:], trainset[:n]


def _candidate_record(candidate) -> dict:
    """``{"seed", "score"}`` of a step's candidate: a Tandem ``Candidate`` or a dspy dict (BFRS, MIPROv2…)."""
    if isinstance(candidate, Candidate):
        return {"seed": candidate.strategy, "score": candidate.score}
    if isinstance(candidate, dict):
        seed = candidate.get("seed", candidate.get("strategy"))
        score = candidate.get("score")
        return {"seed": None if seed is None else str(seed), "score": None if score is None else float(score)}
    return {"seed": None, "score": None}


def _adapters(program: dspy.Module) -> list[AdapterRef]:
    """The adapters the program's predictors use, read from their pool (none off a Tandem pool)."""
    models = {pred.lm.model for pred in program.predictors() if pred.lm is not None}
    try:
        pool = pool_of(program)
    except ValueError:
        return []
    return [AdapterRef(a.name, Path(a.path)) for a in pool.adapter_records() if a.name in models]
