"""Program runs: one (program, example) pair at a time, in the caller's threads or in evaluator actors.

``run_one`` is what one run means everywhere in Tandem: the program on the example's inputs,
then the metric; an answer that does not parse (``AdapterParseError``) is a wrong answer (score
0, ``parse_failure``), any other exception an *error* with its message; the trace's calls are
named by the program's predictors, so a trace can travel between processes. ``run_jobs`` runs
many with a thread pool, stopping early on ``max_errors`` errors or when ``cancelled()`` says so.

``EvaluatorPool`` spreads runs over ``Evaluator`` actors (issue 19): each runs DSPy in its own
process with up to ``threads`` runs at once (a thread pool of its own; a batch reaches it as a
few chunks, so the driver sends a handful of Ray tasks per evaluator, not one per run), so the prompt formatting,
parsing and metric of a run's programs — and the LM calls in flight, one blocked thread each —
are spread over processes and cores instead of one driver. The programs' LMs reach the replicas
themselves (a pool LM's engines pickle as the pool's router). The caller's DSPy settings that
shape a run (``adapter``, ``lm``) are shipped with each batch; the LM calls, tokens and cache
hits an evaluator spends are counted there (``actors.dspy_side.usage.Meter``) and handed back with
``drain``. Programs and metrics must be importable in the workers (Ray ships the driver's
``sys.path`` to local workers; on a cluster, ``py_modules`` / the working dir). An evaluator that
dies loses nothing: its unfinished chunks are sent to the others. Does not know steps, scores,
error limits beyond one batch, or pools.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import dspy
import ray
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.parallelizer import ParallelExecutor

from actors.typed_config import typed_config
from actors.dspy_side.usage import Costs, Meter

logger = logging.getLogger(__name__)

CANCELLED = "cancelled"
CHUNKS_PER_EVALUATOR = 8  # a batch is cut in this many chunks per evaluator, all sent at once (progress, balance)
START_TIMEOUT_S = 120.0  # evaluators that cannot be placed by then fail the run, named
RESENDS = 2  # a chunk whose evaluator died is sent to another this many times, then its runs are errors


@dataclass(frozen=True)
class Run:
    """One program run on one example: its prediction (None on failure), score, trace, error.

    ``trace`` holds ``(predictor name, inputs, outputs)`` per LM-backed call (empty unless asked);
    ``error`` is set for a parse failure too, ``parse_failure`` tells the two apart (only a parse
    failure is a wrong answer, anything else is an error; ``"cancelled"``: never ran).
    """

    example_index: int
    prediction: dspy.Prediction | None
    score: float
    trace: tuple = ()
    error: str | None = None
    parse_failure: bool = False

    @property
    def broke(self) -> bool:
        """It raised something other than a parse failure (cancelled runs are not counted)."""
        return self.error is not None and not self.parse_failure and self.error != CANCELLED


def run_one(index: int, program: dspy.Module, example: dspy.Example, metric: Callable, trace: bool) -> Run:
    """``program`` on ``example``'s inputs, scored by ``metric(example, prediction, trace)``; see the module docstring."""
    try:
        with dspy.context(trace=[]):
            prediction = program(**example.inputs())
            steps = tuple(dspy.settings.trace) if trace else ()
    except AdapterParseError as exc:  # the model answered, wrongly formatted: a wrong answer
        return Run(index, None, 0.0, (), f"{type(exc).__name__}: {exc}", parse_failure=True)
    except Exception as exc:
        return Run(index, None, 0.0, (), f"program raised {type(exc).__name__}: {exc}")
    try:
        score = metric(example, prediction, steps if trace else None)
    except Exception as exc:
        return Run(index, None, 0.0, (), f"metric raised {type(exc).__name__}: {exc}")
    named = ()
    if steps:
        names = {id(pred): name for name, pred in program.named_predictors()}
        named = tuple((names[id(pred)], dict(inputs), dict(outputs.items()))
                      for pred, inputs, outputs in steps if id(pred) in names)
    return Run(index, prediction, float(score or 0), named)


def run_jobs(jobs: Sequence[tuple[dspy.Module, dspy.Example]], metric: Callable, *, trace: bool, num_threads: int,
             max_errors: int, cancelled: Callable[[], bool] = lambda: False,
             done: Callable[[], None] = lambda: None) -> list[Run]:
    """Every job with ``num_threads`` threads; after ``max_errors`` errors or once ``cancelled()``,
    the jobs not started yet come back cancelled. ``done()`` is called after each job."""
    lock, stop, errors = threading.Lock(), threading.Event(), itertools.count(1)

    def one(i: int) -> Run:
        try:
            if stop.is_set() or cancelled():
                return Run(i, None, 0.0, (), CANCELLED)
            run = run_one(i, *jobs[i], metric, trace)
            if run.broke:
                with lock:
                    if next(errors) >= max_errors:
                        stop.set()
            return run
        finally:
            done()

    # timeout=0: no straggler re-runs (dspy re-submits a job running over 120 s, which runs it, its LM calls
    # and its metric twice); a slow request is re-sent by the pool's router (PoolConfig.request_timeout_s)
    executor = ParallelExecutor(num_threads=max(1, num_threads), max_errors=len(jobs) + 1, disable_progress_bar=True,
                                provide_traceback=False, timeout=0)
    return executor.execute(one, list(range(len(jobs))))


class Evaluator:
    """A Ray actor that runs chunks of a batch of jobs on one pool of ``threads`` threads: a chunk's
    jobs queue on it beside the other chunks' (no chunk waits for another to drain)."""

    def __init__(self, threads: int):
        self._meter = Meter()
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tandem-evaluator")
        self._batches: dict[int, tuple] = {}
        self._cancelled: set[int] = set()
        self._errors: dict[int, int] = {}
        self._lock = threading.Lock()

    def run(self, batch: int, shipped: list, indices: list[tuple[int, int, int]], trace: bool,
            max_errors: int, metered: bool) -> list[Run]:
        """Jobs ``(job index, program index, example index)`` of ``batch``; ``shipped`` is ``[ref]``
        to ``(programs, examples, metric, settings)``, fetched once per batch and actor. After
        ``max_errors`` errors here, or ``cancel(batch)``, the jobs not started come back cancelled.
        ``metered``: count the LM calls (DSPy's callbacks cost ~1 ms a run; only when someone counts)."""
        programs, examples, metric, settings = self._batch(batch, shipped[0])
        context = dict(settings)
        if metered:
            context.update(callbacks=[*dspy.settings.get("callbacks", []), self._meter], usage_tracker=self._meter)

        def one(i: int, p: int, e: int) -> Run:
            if batch in self._cancelled:
                return Run(i, None, 0.0, (), CANCELLED)
            with dspy.context(**context):
                run = run_one(i, programs[p], examples[e], metric, trace)
            if run.broke:
                with self._lock:
                    self._errors[batch] = self._errors.get(batch, 0) + 1
                    if self._errors[batch] >= max_errors:
                        self._cancelled.add(batch)
            return run

        futures = [self._threads.submit(one, *job) for job in indices]
        return [f.result() for f in futures]

    def _batch(self, batch: int, ref) -> tuple:
        with self._lock:  # one fetch per batch; later chunks wait for it
            if batch not in self._batches:
                self._batches = {batch: ray.get(ref)}  # older batches are done
                self._errors = {batch: 0}
            return self._batches[batch]

    def cancel(self, batch: int) -> None:
        """Chunks of ``batch`` not run yet come back cancelled."""
        self._cancelled.add(batch)

    def drain(self) -> Costs:
        """What this evaluator spent since the last ``drain``."""
        with self._lock:
            spent, self._meter = self._meter.costs(), Meter()
        return spent

    def pid(self) -> int:
        return os.getpid()


@typed_config
class EvaluatorConfig:
    """Where program runs happen: ``count`` 0 in the driver's threads, else in that many evaluator actors."""

    count: int = field(default=0, metadata={
        "help": "evaluator actors that run the programs (0 = in the driver's threads, `threads` at once); on a "
                "cluster with many replicas, enough that count x threads covers the calls the replicas batch"})
    threads: int = field(default=128, metadata={"help": "program runs (LM calls in flight) per evaluator at once"})
    num_cpus: float = field(default=1.0, metadata={"help": "CPUs each evaluator reserves"})
    resources: dict[str, float] = field(default_factory=dict, metadata={
        "help": "custom Ray resources each evaluator reserves (to place them on the nodes that offer them)"})

    def __post_init__(self):
        if self.count < 0 or self.threads < 1 or self.num_cpus < 0:
            raise ValueError(f"evaluators: count >= 0, threads >= 1 and num_cpus >= 0, got {self}")


class EvaluatorPool:
    """``cfg.count`` ``Evaluator`` actors; ``run`` spreads one batch of jobs over them."""

    def __init__(self, cfg: EvaluatorConfig):
        self.cfg = cfg
        self._actors: list = []
        self._batches = itertools.count(1)

    def start(self) -> "EvaluatorPool":
        if not self._actors:
            cls = ray.remote(Evaluator).options(
                num_cpus=self.cfg.num_cpus, resources=self.cfg.resources or {},
                max_concurrency=CHUNKS_PER_EVALUATOR + 2,  # every chunk at once, and cancel / drain beside them
                scheduling_strategy="SPREAD", max_restarts=0)
            self._actors = [cls.remote(self.cfg.threads) for _ in range(self.cfg.count)]
            try:
                ray.get([a.pid.remote() for a in self._actors], timeout=START_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                self.stop()
                raise TimeoutError(
                    f"{self.cfg.count} evaluator(s) of {self.cfg.num_cpus:g} CPU {self.cfg.resources or ''} could "
                    f"not be placed in {START_TIMEOUT_S:.0f}s; free now: {ray.available_resources()}. Lower "
                    "evaluators.count / evaluators.num_cpus, or add nodes") from None
            logger.info("evaluators: %d actor(s) x %d threads", len(self._actors), self.cfg.threads)
        return self

    def stop(self) -> None:
        actors, self._actors = self._actors, []
        for actor in actors:
            ray.kill(actor)

    def __enter__(self) -> "EvaluatorPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, jobs: Sequence[tuple[dspy.Module, dspy.Example]], metric: Callable, *, trace: bool,
            max_errors: int, metered: bool = True, cancelled: Callable[[], bool] = lambda: False,
            done: Callable[[int], None] = lambda n: None) -> tuple[list[Run], Costs]:
        """Every job on the evaluators; the runs in job order and what the evaluators spent (zero
        unless ``metered``).

        Stops early (the rest comes back cancelled) after ``max_errors`` errors or once ``cancelled()``.

        Raises:
            RuntimeError: no evaluator is running.
        """
        if not self._actors:
            raise RuntimeError("the evaluator pool is not started")
        programs, pindex = _unique([p for p, _ in jobs])
        examples, eindex = _unique([e for _, e in jobs])
        settings = {k: dspy.settings.get(k) for k in ("adapter", "lm") if dspy.settings.get(k) is not None}
        batch = next(self._batches)
        shipped = [ray.put((programs, examples, metric, settings))]
        size = max(1, math.ceil(len(jobs) / (len(self._actors) * CHUNKS_PER_EVALUATOR)))
        chunks = [[(i, pindex[i], eindex[i]) for i in range(s, min(len(jobs), s + size))]
                  for s in range(0, len(jobs), size)]
        options, pending = (trace, max_errors, metered), {}  # chunk result ref -> (chunk, n, tries, its actor)
        for n, chunk in enumerate(chunks):
            pending.update(self._send(batch, shipped, chunk, options, n, 0))
        runs: dict[int, Run] = {}
        broke, stopped = 0, False
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                chunk, n, tries, actor = pending.pop(ref)
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # the evaluator died: resend, or count as errors
                    self._actors = [a for a in self._actors if a is not actor]
                    if tries < RESENDS and self._actors:
                        logger.warning("an evaluator died (%s); its chunk of %d runs goes to another",
                                       type(exc).__name__, len(chunk))
                        pending.update(self._send(batch, shipped, chunk, options, n, tries + 1))
                        continue
                    got = [Run(i, None, 0.0, (), f"evaluator died: {type(exc).__name__}: {exc}") for i, _, _ in chunk]
                runs.update((r.example_index, r) for r in got)
                broke += sum(r.broke for r in got)
                done(len(got))
            if not stopped and (broke >= max_errors or cancelled()):
                stopped = True
                for actor in self._actors:
                    actor.cancel.remote(batch)
        spent = sum(ray.get([a.drain.remote() for a in self._actors]), Costs())
        return [runs[i] for i in range(len(jobs))], spent

    def _send(self, batch: int, shipped: list, chunk: list, options: tuple, n: int, tries: int) -> dict:
        """``{result ref: (chunk, n, tries, actor)}`` for chunk ``n`` sent to the ``n``-th live evaluator."""
        actor = self._actors[n % len(self._actors)]
        return {actor.run.remote(batch, shipped, chunk, *options): (chunk, n, tries, actor)}


def _unique(objects: list) -> tuple[list, list[int]]:
    """The distinct objects (by identity) and each position's index into them."""
    seen: dict[int, int] = {}
    out = []
    for obj in objects:
        if id(obj) not in seen:
            seen[id(obj)] = len(out)
            out.append(obj)
    return out, [seen[id(obj)] for obj in objects]

