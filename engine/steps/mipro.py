"""``MIPROStep``: dspy's MIPROv2 (instructions and demos searched together) as a step kind, on the pool.

Runs ``PoolMIPROv2``, dspy's MIPROv2 with its two serial loops made concurrent, built at compile time
so that its task model is the program's LM as the step gets it (after a weight step: the fine-tuned
one; dspy binds ``settings.lm`` at construction) and its prompt model is the program's LM unless
``prompt_model=`` is given:

- Demo sets (MIPROv2's step 1): dspy bootstraps each of its N candidate sets with its own
  ``BootstrapFewShot``, one example at a time (measured: ~4.5 min on the embedded model). Here the
  teacher runs over the trainset once, every example at once, and the N sets are drawn from those
  traces as ``engine.steps.prompt.PromptStep`` draws its candidates (seed -3 zero-shot, -2 labelled,
  -1 the first passing examples, ``s >= 0`` a shuffled order; each shuffled set uses its own
  ``random.Random`` instead of dspy's one shared generator, so the sets differ from dspy's for the
  same seed; the teacher's answer for an example is the same in every set).
- The dataset summary the proposals read (a chain of prompt-model calls over the trainset) is written on
  a thread of its own while step 1 bootstraps (dspy writes it after).
- Instruction proposal (step 2): dspy asks for one instruction at a time. Here the tips and rollout ids
  are drawn in dspy's order from its generator (the same draws for the same seed), then every proposal
  is asked at once on ``num_threads`` threads. The default prompt model is the program's LM with room
  for an instruction (``engine.steps.options.with_room``); a proposal whose answer does not parse (a small model's
  instruction cut at max_tokens; stock MIPROv2 then fails the whole run) leaves that candidate with the
  program's instruction, counted in a warning; any other error fails the step.
- Trials (step 3): dspy's, one at a time by default. ``trials_at_once: N`` runs N at once (optuna's
  ``n_jobs``: each thread asks TPE for a trial, so a trial is proposed without the scores of the N-1 still
  running — a wider, less informed search per round, and thread timing makes the order, so a seed no
  longer fixes the result). Only each trial's evaluation runs concurrently; dspy's bookkeeping around it
  (best program, logs) runs under one lock, so no better score is overwritten. Full-valset trials only
  (``minibatch: false``, which ``auto`` picks for a valset of at most 50): dspy schedules its minibatch
  mode's full evaluations by trial number, which concurrent trials would reorder; refused up front.

Its evaluations run on ``num_threads`` concurrent program runs sized to the pool (dspy's default is
8). ``optuna`` (its search, which dspy imports only after bootstrapping and instruction proposal have
spent their LM calls) is a dependency (``dspy[optuna]``) and is imported here before any LM call.
Compile arguments (``num_trials``, ``max_bootstrapped_demos``, ``minibatch`` …) come from the run's
per-step ``compile_args``. Does not know run dirs or pools.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import logging
import random
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import dspy
from dspy.propose import GroundedProposer
from dspy.propose.dataset_summary_generator import create_dataset_summary
from dspy.propose.grounded_proposer import TIPS
from dspy.teleprompt import mipro_optimizer_v2 as stock
from dspy.teleprompt.teleprompt import Teleprompter
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.parallelizer import ParallelExecutor

from engine.steps.options import check_options, with_room
from engine.steps.prompt import PromptStep

logger = logging.getLogger(__name__)


class MIPROStep(Teleprompter):
    """Run ``PoolMIPROv2`` as a BetterTogether step (see the module docstring).

    Args:
        metric: the program's metric.
        prompt_model: the LM that proposes instructions; default the program's LM.
        num_threads: concurrent program runs and proposals (size it to the pool).
        auto: MIPROv2's preset ('light', 'medium', 'heavy'; None with ``num_candidates``).
        seed: MIPROv2's seed.
        trials_at_once: trials evaluated at the same time (1: dspy's sequential search; see the module docstring).
        **mipro_options: more ``dspy.MIPROv2`` constructor arguments (``num_candidates``,
            ``max_bootstrapped_demos``, ``max_labeled_demos``, ``init_temperature`` …).

    Example:
        >>> step = MIPROStep(iris.metric, auto="light", num_threads=32)  # doctest: +SKIP
        >>> tuned = step.compile(program, trainset=train, valset=val, num_trials=10)  # doctest: +SKIP
    """

    def __init__(self, metric: Callable, *, prompt_model: dspy.LM | None = None, num_threads: int = 32,
                 auto: str | None = "light", seed: int = 9, trials_at_once: int = 1, **mipro_options: Any):
        import optuna  # noqa: F401  # pyflakes: ignore -- dspy imports it only after the bootstrap's LM calls

        check_options(dspy.MIPROv2.__init__, mipro_options, ours={"metric", "task_model"}, name="MIPROv2")
        if trials_at_once < 1:
            raise ValueError(f"trials_at_once must be >= 1, got {trials_at_once}")
        self.trials_at_once = trials_at_once
        self.metric = metric
        self.prompt_model = prompt_model
        self.num_threads = num_threads
        self.auto = auto
        self.seed = seed
        self.mipro_options = mipro_options

    def compile(self, student: dspy.Module, *, trainset: list, valset: list | None = None, teacher=None,
                **compile_args: Any) -> dspy.Module:
        """MIPROv2 on ``student`` with ``compile_args`` (dspy's ``MIPROv2.compile`` arguments)."""
        lms = {id(p.lm): p.lm for p in student.predictors() if p.lm is not None}
        task = next(iter(lms.values())) if len(lms) == 1 else None
        if self.trials_at_once > 1 and self._minibatch(valset or trainset, compile_args):
            raise ValueError(f"trials_at_once={self.trials_at_once} runs full-valset trials only; this run would use "
                             "MIPROv2's minibatch mode: pass compile_args minibatch: false")
        prompt = self.prompt_model or (with_room(task) if task is not None else None)
        optimizer = PoolMIPROv2(metric=self.metric, prompt_model=prompt, task_model=task,
                                num_threads=self.num_threads, auto=self.auto, seed=self.seed, **self.mipro_options)
        optimizer.trials_at_once = self.trials_at_once
        return optimizer.compile(student, trainset=trainset, valset=valset or None, teacher=teacher, **compile_args)

    def _minibatch(self, valset: list, compile_args: dict) -> bool:
        """Whether MIPROv2 will evaluate trials on minibatches (as its ``compile`` decides)."""
        if self.auto is None:
            return bool(compile_args.get("minibatch", True))
        return min(len(valset), stock.AUTO_RUN_SETTINGS[self.auto]["val_size"]) > stock.MIN_MINIBATCH_SIZE


class PoolMIPROv2(dspy.MIPROv2):
    """dspy's MIPROv2 whose demo sets and instruction proposals are made concurrently, and whose trials can run
    ``trials_at_once`` at a time (module docstring)."""

    trials_at_once = 1
    _summary: Future | None = None  # the dataset summary being written (compile starts it)

    def compile(self, student, *, trainset, data_aware_proposer: bool = True, view_data_batch_size: int = 10,
                **kwargs):
        """dspy's ``compile``; the dataset summary for the proposals (a chain of prompt-model calls over the
        trainset) is written beside step 1's bootstrap instead of after it."""
        self._summary = None
        if data_aware_proposer and self.prompt_model is not None:
            self._summary = _in_background(create_dataset_summary, trainset=trainset,
                                           view_data_batch_size=view_data_batch_size, prompt_model=self.prompt_model)
        return super().compile(student, trainset=trainset, data_aware_proposer=data_aware_proposer,
                               view_data_batch_size=view_data_batch_size, **kwargs)

    def _optimize_prompt_parameters(self, program, instruction_candidates, demo_candidates, evaluate, valset,
                                    num_trials, minibatch, minibatch_size, minibatch_full_eval_steps, seed):
        args = (program, instruction_candidates, demo_candidates, evaluate, valset, num_trials, minibatch,
                minibatch_size, minibatch_full_eval_steps, seed)
        if self.trials_at_once <= 1:
            return super()._optimize_prompt_parameters(*args)
        if minibatch:
            raise ValueError("trials_at_once > 1 runs full-valset trials only (minibatch: false)")
        logger.info("MIPROv2 step 3: %d trials, %d at a time", num_trials, self.trials_at_once)
        with _concurrent_trials(self.trials_at_once):
            return super()._optimize_prompt_parameters(*args)

    def _bootstrap_fewshot_examples(self, program: Any, trainset: list, seed: int, teacher: Any, *,
                                    num_fewshot_candidates: int, max_bootstrapped_demos: int, max_labeled_demos: int,
                                    max_errors: int | None, metric_threshold: float | None) -> dict | None:
        if metric_threshold is not None:
            raise ValueError("metric_threshold is not supported by Tandem's MIPROv2 step (its bootstrap passes a "
                             "trace whose metric is truthy)")
        zeroshot = max_bootstrapped_demos == 0 and max_labeled_demos == 0
        draw = PromptStep(self.metric, num_candidate_programs=max(0, num_fewshot_candidates - 3),
                          max_bootstrapped_demos=stock.BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT if zeroshot
                          else max_bootstrapped_demos,
                          max_labeled_demos=stock.LABELED_FEWSHOT_EXAMPLES_IN_CONTEXT if zeroshot else max_labeled_demos,
                          num_threads=self.num_threads, seed=seed)
        logger.info("MIPROv2 step 1: %d demo sets from one concurrent bootstrap of %d examples",
                    num_fewshot_candidates, len(trainset))
        traces = draw.teacher_traces(program, teacher, trainset)
        sets: dict[int, list] = {i: [] for i in range(len(program.predictors()))}
        for candidate_seed in range(-3, num_fewshot_candidates - 3):
            candidate = draw.candidate(program, candidate_seed, trainset, traces)
            for i, pred in enumerate(candidate.predictors()):
                sets[i].append(pred.demos)
        return sets

    def _propose_instructions(self, program: Any, trainset: list, demo_candidates: dict | None,
                              view_data_batch_size: int, program_aware_proposer: bool, data_aware_proposer: bool,
                              tip_aware_proposer: bool, fewshot_aware_proposer: bool,
                              num_instruct_candidates: int) -> dict[int, list[str]]:
        summary = self._summary
        proposer = ConcurrentProposer(
            program=program, trainset=trainset, prompt_model=self.prompt_model,
            view_data_batch_size=view_data_batch_size, program_aware=program_aware_proposer,
            use_dataset_summary=data_aware_proposer and summary is None, use_task_demos=fewshot_aware_proposer,
            num_demos_in_context=stock.BOOTSTRAPPED_FEWSHOT_EXAMPLES_IN_CONTEXT, use_tip=tip_aware_proposer,
            set_tip_randomly=tip_aware_proposer, use_instruct_history=False, set_history_randomly=False,
            verbose=self.verbose, rng=self.rng, init_temperature=self.init_temperature)
        proposer.num_threads = self.num_threads
        if data_aware_proposer and summary is not None:
            proposer.take_summary(summary)
        candidates = proposer.propose_instructions_for_program(trainset=trainset, program=program,
                                                               demo_candidates=demo_candidates,
                                                               N=num_instruct_candidates, trial_logs={})
        for i, pred in enumerate(program.predictors()):  # candidate 0 is the program's own (dspy's)
            candidates[i][0] = stock.get_signature(pred).instructions
        return candidates


@contextlib.contextmanager
def _concurrent_trials(n: int):
    """Inside: optuna studies optimize with ``n_jobs=n``; each trial (dspy's objective) holds one lock except
    while its program is evaluated (dspy's ``eval_candidate_program``), so evaluations overlap and dspy's
    bookkeeping (best score and program, logs) runs one trial at a time."""
    import optuna

    lock, local = threading.Lock(), threading.local()
    create, evaluate = optuna.create_study, stock.eval_candidate_program

    def locked(objective):
        def trial(t):
            with lock:
                local.in_trial = True
                try:
                    return objective(t)
                finally:
                    local.in_trial = False
        return trial

    def create_study(*args, **kwargs):
        study = create(*args, **kwargs)
        optimize = study.optimize
        study.optimize = lambda func, n_trials=None, **kw: optimize(locked(func), n_trials=n_trials,
                                                                    **{**kw, "n_jobs": n})
        return study

    def eval_candidate_program(*args, **kwargs):
        if not getattr(local, "in_trial", False):
            return evaluate(*args, **kwargs)
        lock.release()  # the evaluation runs beside the other trials'; the bookkeeping after it does not
        try:
            return evaluate(*args, **kwargs)
        finally:
            lock.acquire()

    optuna.create_study, stock.eval_candidate_program = create_study, eval_candidate_program
    try:
        yield
    finally:
        optuna.create_study, stock.eval_candidate_program = create, evaluate


def _in_background(fn: Callable, **kwargs: Any) -> Future:
    """``fn(**kwargs)`` on a thread of its own, in a copy of the caller's context (dspy's settings)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="mipro-summary")
    try:
        return pool.submit(contextvars.copy_context().run, functools.partial(fn, **kwargs))
    finally:
        pool.shutdown(wait=False)


UNPARSED = object()  # a proposal whose answer did not parse


class _Drawn(random.Random):
    """A generator whose ``randint`` returns a value drawn beforehand (a proposal's rollout id)."""

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def randint(self, a: int, b: int) -> int:
        return self.value


class ConcurrentProposer(GroundedProposer):
    """dspy's GroundedProposer asking every instruction at once: each proposal gets its tip and rollout id
    drawn beforehand in dspy's order from the shared generator, and its own copy of the proposer."""

    num_threads = 8

    def take_summary(self, summary: Future) -> None:
        """Use the dataset summary written in the background (``summary``'s result), as dspy's ``__init__``
        would have written it; if writing it failed, go on without one, as dspy does."""
        try:
            self.data_summary, self.use_dataset_summary = summary.result(), True
        except Exception as exc:  # noqa: BLE001 -- dspy's own rule: a proposer without the data summary
            logger.warning("MIPROv2's dataset summary failed (%s); proposing without it, as dspy does", exc)
            self.data_summary, self.use_dataset_summary = None, False

    def propose_instructions_for_program(self, trainset, program, demo_candidates, trial_logs,
                                         N) -> dict[int, list[str]]:  # noqa: N803 (dspy's name)
        if not demo_candidates:
            self.use_task_demos = False
            num_demos = N
        else:
            num_demos = max(len(demo_candidates[0]), 1)
        jobs = []
        for pred_i, predictor in enumerate(program.predictors()):
            for demo_set_i in range(num_demos)[:min(N, num_demos)]:
                tip, use_tip = None, self.use_tip
                if self.set_tip_randomly:
                    tip = TIPS[self.rng.choice(list(TIPS.keys()))]
                    use_tip = bool(tip)
                one = copy.copy(self)  # its own tip switch and rollout id; the rest is shared and read-only
                one.use_tip, one.rng = use_tip, _Drawn(self.rng.randint(0, 10**9))
                jobs.append((one, pred_i, predictor, demo_set_i, tip))

        def ask(job):
            one, pred_i, predictor, demo_set_i, tip = job
            try:
                return one.propose_instruction_for_predictor(program=program, predictor=predictor, pred_i=pred_i,
                                                             demo_candidates=demo_candidates, demo_set_i=demo_set_i,
                                                             trial_logs=trial_logs, tip=tip)
            except AdapterParseError:  # a wrong answer (e.g. cut at max_tokens): this candidate keeps the instruction
                return UNPARSED
            except Exception as exc:  # raised below, after the others finished
                return exc

        logger.info("MIPROv2 step 2: %d instruction proposals at once (%d threads)", len(jobs), self.num_threads)
        answers = ParallelExecutor(num_threads=max(1, min(self.num_threads, len(jobs))), disable_progress_bar=True,
                                   max_errors=len(jobs) + 1, provide_traceback=False, timeout=0).execute(ask, jobs)
        failed = [a for a in answers if isinstance(a, Exception)]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(jobs)} instruction proposals failed: "
                               f"{type(failed[0]).__name__}: {failed[0]}") from failed[0]
        unparsed = sum(a is UNPARSED for a in answers)
        if unparsed:
            logger.warning("MIPROv2 step 2: %d of %d instruction proposals did not parse (the prompt model's answer "
                           "was cut or malformed); those candidates keep the program's instruction", unparsed, len(jobs))
        proposed: dict[int, list[str]] = {}
        for (_, pred_i, predictor, *_), answer in zip(jobs, answers):
            keep = stock.get_signature(predictor).instructions
            proposed.setdefault(pred_i, []).append(keep if answer is UNPARSED else answer)
        return proposed
