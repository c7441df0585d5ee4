"""``WeightStep``: the paper's BootstrapFinetune — traces, vanilla-prompt chat data, LoRA, new model id.

Knows the step's data flow: bootstrap traces on the trainset with the current prompts (or with
``teacher=``, a program with the same predictors, e.g. on a stronger model), in parallel, an
example never seeing itself among the demos; keep only runs that pass the metric; turn every predictor call into a chat row; write them as Parquet
in the step dir; then hand them to
``actors.dspy_side.finetune`` (Ray Train LoRA, the ``relaunch``/``hotswap`` lifecycle, unique adapter ids)
through the program's own LM — its ``TandemProvider``, as dspy's BootstrapFinetune reaches its
backend through ``lm.finetune`` — and point the predictors at the new ids. One adapter for the LM
(multitask, the default) or one per predictor (``multitask=False``, as dspy's BootstrapFinetune).
The returned program's prompts are what its adapter was trained on: ``exclude_demos=True`` (the
default, the paper's) trains on the *vanilla* prompt and returns the program without demos (a
later ``p`` step adds demos back, on the tuned LM); ``exclude_demos=False`` (dspy 3.4.1's default)
trains on the prompts with the program's demos and keeps them.
Zero passing traces is an error that says so and why. Does not know strategies or the run dir
layout beyond the ``step_dir`` and ``adapter_root`` it is given.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from actors.dspy_side.finetune import LIFECYCLES
from actors.training.config import LoraTrainConfig
from actors.training.rows import write_rows
from actors.inference.pool import ReplicaPool
from actors.dspy_side.provider import TandemProvider
from engine.steps.bootstrap import (BootstrapResult, as_demo, bootstrap, chat_rows, copy_without_demos, labeled,
                                   teacher_on)

logger = logging.getLogger(__name__)


class NoTrainingDataError(RuntimeError):
    """The program passed the metric on no training example: there is nothing to fine-tune on."""


class WeightStep(Teleprompter):
    """Bootstrap traces and fine-tune LoRA adapters of the program's pool LM.

    Args:
        metric: ``metric(example, prediction, trace)``; a trace is kept only when it passes.
        train: LoRA and optimisation settings (paper defaults).
        lifecycle: 'relaunch' or 'hotswap' (see ``actors.dspy_side.finetune``).
        num_threads: concurrent LM calls while bootstrapping.
        multitask: one adapter shared by all predictors (default) or one per predictor.
        exclude_demos: train on vanilla prompts and return the program without demos (default,
            the paper's); False trains with the program's demos in the prompt and keeps them.
        max_rounds: runs per training example at most while collecting traces (1, the default, is
            the paper's single greedy pass; see ``engine.steps.bootstrap.bootstrap``).
        storage: a URI (or shared path) for Ray Train's checkpoints, ``STORAGE/ray_train/ft-NN``, so
            that training workers on any node and the driver reach them (a multi-node cluster without
            a shared filesystem needs one); default the step dir, which only the driver's node sees.
        teacher_lm: when ``compile`` gets no ``teacher``, the traces come from the student's program on this
            LM (e.g. a larger model of the run's ``models:``); only the student's LM is fine-tuned.
        teacher_demos: labelled demos per predictor (sampled from the trainset, as dspy's BootstrapFewShot gives
            its teacher ``max_labeled_demos``) the teacher answers with; an example never sees itself among
            them, and the training rows keep the student's own prompt. 0 (default): the teacher as given.
        teacher_bootstrap: the teacher's demos are its own passing traces instead of labelled examples: it first
            runs on the trainset with no demos, up to ``teacher_demos`` of its passing traces per predictor
            (reasoning included: a labelled demo carries only the answer, and the teacher then writes none)
            become its demos for the traces the student learns, and an example it passed only in that first
            run keeps that trace. Needs ``teacher_demos`` > 0.
        after_teacher: called once ``teacher_lm``'s traces are in, before training (the run releases the
            teacher's replicas there when no later step uses them).

    Example:
        >>> step = WeightStep(metric, LoraTrainConfig(epochs=2), lifecycle="relaunch")  # doctest: +SKIP
        >>> tuned = step.compile(program, trainset=train)  # doctest: +SKIP
    """

    def __init__(self, metric: Callable, train: LoraTrainConfig | None = None, lifecycle: str = "relaunch",
                 num_threads: int = 16, multitask: bool = True, exclude_demos: bool = True, max_rounds: int = 1,
                 storage: str | None = None, teacher_lm: dspy.LM | None = None, teacher_demos: int = 0,
                 teacher_bootstrap: bool = False, after_teacher: Callable[[], None] | None = None):
        if teacher_demos < 0:
            raise ValueError(f"teacher_demos must be >= 0, got {teacher_demos}")
        if teacher_bootstrap and not teacher_demos:
            raise ValueError("teacher_bootstrap needs teacher_demos > 0: how many of the teacher's own passing traces "
                             "become its demos")
        if lifecycle not in LIFECYCLES:
            raise ValueError(f"lifecycle must be one of {LIFECYCLES}, got {lifecycle!r}")
        self.metric = metric
        self.train = train or LoraTrainConfig()
        self.lifecycle = lifecycle
        self.num_threads = num_threads
        self.multitask = multitask
        self.exclude_demos = exclude_demos
        self.max_rounds = max_rounds
        self.storage = storage
        self.teacher_lm = teacher_lm
        self.teacher_demos = teacher_demos
        self.teacher_bootstrap = teacher_bootstrap
        self.after_teacher = after_teacher
        self.last_run: dict = {}  # what the last compile did: rows, traces, adapters, train metrics

    def compile(self, student: dspy.Module, *, trainset: list, teacher=None, valset=None,
                step_dir: str | Path | None = None, adapter_root: str | Path | None = None,
                step_index: int = 0) -> dspy.Module:
        """Fine-tune on ``trainset`` traces (of ``teacher`` when given); ``valset`` is unused (as in dspy).

        Args:
            student: the program; every predictor uses the LM of one pool (``pool_lm(pool)``).
            trainset: examples to bootstrap traces on.
            teacher: a program with the student's predictors (names) whose passing traces are the
                training data, as in dspy's BootstrapFinetune; default the student itself.
            step_dir: where the traces Parquet and Ray Train's files go (default a new temp dir).
            adapter_root: where the adapters go (default ``step_dir``).
            step_index: the step's position in its strategy (names the adapter versions ``ft-NN``).

        Raises:
            NoTrainingDataError: no training example passed the metric.
            ValueError: a teacher whose predictors are not the student's.
            engine.evaluate.TooManyErrors: bootstrapping hit ``max_errors`` errors.
        """
        provider = provider_of(student)
        if isinstance(teacher, list):  # dspy's BetterTogether passes a list
            teacher = teacher[0] if teacher else None
        if teacher is None and self.teacher_lm is not None:
            teacher = teacher_on(student, self.teacher_lm)
        first, shown = None, set()  # the teacher's own first run, when its demos come from it; their examples
        if teacher is not None and self.teacher_demos:
            if self.teacher_bootstrap:
                teacher, first, shown = self._self_taught(_check_teacher(teacher, student), trainset)
            else:
                teacher = labeled(teacher, trainset, self.teacher_demos, sample=True)
        source = _check_teacher(teacher, student) if teacher is not None else student
        step_dir = Path(step_dir or tempfile.mkdtemp(prefix="tandem-w-"))
        step_dir.mkdir(parents=True, exist_ok=True)
        if first is None:
            result = bootstrap(source, trainset, self.metric, num_threads=self.num_threads, exclude_own_demo=True,
                               desc="bootstrap traces" + (" (teacher)" if teacher is not None else ""),
                               max_rounds=self.max_rounds)
        else:
            result = self._with_own_demos(source, trainset, first, shown)
        if self.teacher_lm is not None and self.after_teacher is not None:
            self.after_teacher()
        rows = chat_rows(student, result.traces, with_demos=not self.exclude_demos)
        if not rows:
            hint = (f"{result.broken} of them broke (not a wrong answer): fix that first, e.g. a pool with no live "
                    "replica or a metric that raises" if result.broken else
                    "Run a prompt step first (e.g. 'p -> w') or check the metric")
            raise NoTrainingDataError(
                f"no passing traces: the program passed the metric on 0 of {result.attempted} training examples "
                f"({result.parse_failures} runs did not parse, {result.broken} failed with an error, e.g. "
                f"{result.errors[:1]}); fine-tuning has no data. {hint}.")
        write_rows(rows, step_dir / "traces.parquet")
        logger.info("weight step: %d chat rows from %d passing traces of %d examples", len(rows),
                    len(result.traces), result.attempted)
        datasets = {"": step_dir / "traces.parquet"}
        if not self.multitask:
            names = sorted({r["predictor"] for r in rows})
            datasets = {name: step_dir / f"traces-{i}.parquet" for i, name in enumerate(names)}
            for name, path in datasets.items():
                write_rows([r for r in rows if r["predictor"] == name], path)
        trained = provider.train_adapters(datasets, self.train, lifecycle=self.lifecycle,
                                          adapter_root=adapter_root or step_dir, prefix=f"ft-{step_index:02d}",
                                          storage=self._train_storage(step_dir, step_index))
        self.last_run = {"rows": len(rows), "passing_traces": len(result.traces), "attempted": result.attempted,
                         "lifecycle": self.lifecycle, "teacher": teacher is not None,
                         "teacher_model": _model_of(teacher) if teacher is not None else None,
                         "teacher_demos": self.teacher_demos, "teacher_bootstrap": self.teacher_bootstrap,
                         "teacher_first_pass": len(first.traces) if first is not None else None,
                         "exclude_demos": self.exclude_demos, "max_rounds": self.max_rounds,
                         "trained": [{"predictors": tag or "*", "adapter": r.name, "adapter_path": r.path,
                                      "train_metrics": r.metrics} for tag, r in trained.items()]}
        tuned = student.deepcopy()
        for name, pred in tuned.named_predictors():
            pred.lm = pred.lm.copy(model=trained[name if not self.multitask else ""].name)
            if self.exclude_demos:
                pred.demos = []  # the prompt the adapter was trained on
        return tuned


    def _self_taught(self, teacher: dspy.Module, trainset: list) -> tuple[dspy.Module, BootstrapResult, set[int]]:
        """The teacher with up to ``teacher_demos`` of its own passing traces per predictor as demos (drawn with
        ``random.Random(0)``), the result of its first, demo-less run, and the indices of the examples whose
        traces became demos."""
        first = bootstrap(copy_without_demos(teacher), trainset, self.metric, num_threads=self.num_threads,
                          desc="bootstrap the teacher's own demos (teacher)")
        taught, rng, shown = copy_without_demos(teacher), random.Random(0), set()
        for name, pred in taught.named_predictors():
            demos = [(trace, demo) for trace in first.traces if (demo := as_demo(trace, name)) is not None]
            chosen = rng.sample(demos, min(self.teacher_demos, len(demos)))
            pred.demos = [demo for _, demo in chosen]
            shown |= {trace.example_index for trace, _ in chosen}
        return taught, first, shown

    def _with_own_demos(self, teacher: dspy.Module, trainset: list, first: BootstrapResult,
                        shown: set[int]) -> BootstrapResult:
        """The self-taught teacher's traces: it runs every example but those its demos came from (``shown``: a
        demo holds the example's answer; run with it, the teacher would copy it), which, like any example it
        passed only in its first run, keep their first-run trace."""
        todo = [i for i in range(len(trainset)) if i not in shown]
        second = bootstrap(teacher, [trainset[i] for i in todo], self.metric, num_threads=self.num_threads,
                           desc="bootstrap traces (teacher, its own demos)", max_rounds=self.max_rounds)
        traces = {todo[t.example_index]: replace(t, example_index=todo[t.example_index]) for t in second.traces}
        for trace in first.traces:
            traces.setdefault(trace.example_index, trace)
        return replace(second, traces=[traces[i] for i in sorted(traces)], attempted=len(trainset))

    def _train_storage(self, step_dir: Path, step_index: int) -> str | Path:
        if self.storage is None:
            return (step_dir / "ray_train").resolve()
        return f"{self.storage.rstrip('/')}/ray_train/ft-{step_index:02d}"


def _model_of(program: dspy.Module) -> str | None:
    """The model id a program's predictors share (None: several or none)."""
    models = {pred.lm.model for pred in program.predictors() if pred.lm is not None}
    return models.pop() if len(models) == 1 else None


def _check_teacher(teacher: dspy.Module, student: dspy.Module) -> dspy.Module:
    """``teacher`` if its predictors are the student's (by name: traces map call by call)."""
    theirs, ours = [n for n, _ in teacher.named_predictors()], [n for n, _ in student.named_predictors()]
    if sorted(theirs) != sorted(ours):
        raise ValueError(f"the teacher's predictors {theirs} are not the student's {ours}: the weight step maps "
                         "a teacher's calls to the student's predictors by name")
    return teacher


def provider_of(program: dspy.Module) -> TandemProvider:
    """The provider (and so the pool) every predictor's LM reaches its replicas through.

    Raises:
        ValueError: a predictor has no LM, or an LM that is not a Tandem pool LM (``pool_lm(pool)``), or
            LMs of two pools.
    """
    providers = {}
    for name, pred in program.named_predictors():
        provider = getattr(pred.lm, "provider", None)
        if not isinstance(provider, TandemProvider):
            raise ValueError(f"predictor {name!r} needs a Tandem pool LM (pool_lm(pool)) for the weight step, "
                             f"got {type(pred.lm).__name__ if pred.lm else 'no LM'}"
                             f"{' without a TandemProvider' if pred.lm is not None else ''}")
        providers[provider.pool.cfg.name] = provider
    if len(providers) != 1:
        raise ValueError(f"the weight step fine-tunes one pool's LM; predictors use pools {sorted(providers)}")
    return providers.popitem()[1]


def pool_of(program: dspy.Module) -> ReplicaPool:
    """The pool of ``provider_of(program)``."""
    return provider_of(program).pool
