"""``run(cfg)``: the driver of one optimization run, from launching the pool to the report.

Knows the order of things: take the run dir's lock (one writer: ``engine.store.lock``), connect to
Ray, launch the pool (and the model groups around the steps that use them: ``engine.groups``), build
the program with the pool's LM, run BetterTogether with Tandem's steps into the run dir (resuming completed steps), score
every step's program on the held-out test split (``engine.held_out``; stored per step, so a rerun
does not score again), save the winner (``program.json`` + ``best.json``), write the report, and
kill the pool whatever happens (try/finally, so Ctrl-C leaves no replica behind); then mirror the
run dir into MLflow (``engine.report.tracking``; also after a failure or a stop, never failing the run
itself).
Does not know vLLM or training internals.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import dspy

from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
from actors.runtime import run_slug
from actors.dspy_side import usage
from actors.dspy_side.provider import pool_lm
from actors.dspy_side.usage import Costs
from engine.adapters.registry import check_fits, make_adapter, stop_for
from engine.better_together import BetterTogether
from engine.config import RunConfig
from engine.console import FILE_ONLY, first_line
from engine.groups import ModelGroups
from engine.evaluate import TooManyErrors, collect_errors, evaluators_of
from engine.held_out import HeldOut, score_held_out
from engine.plan import check, describe, make_plan, nodes_now, suggest, summary, warnings
from engine.store.program_io import save_program
from engine.report.run_report import write_report
from engine.store.run_store import BestRecord, RunStore
from engine.store.lock import hold
from engine.store.remote import pull, push
from engine.report.tracking import TrackedRun, track_run_or_warn
from engine.steps.kinds import StepContext
from engine.steps.kinds import build as build_step
from programs.base import ProgramSpec, Splits, resolve

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """What a run produced."""

    run_dir: Path
    best_strategy: str
    best_score: float | None
    scores: dict[str, float | None]
    failed: bool
    wall_s: float
    test: dict[str, HeldOut]  # strategy prefix -> its program on the test split (empty: not scored)
    tracked: TrackedRun | None = None  # where MLflow has it (None: tracking off or failed, with a warning)
    costs: Costs | None = None  # what this invocation spent (steps done in an earlier run not included)
    error: str | None = None  # what stopped the strategy early (``failed``), e.g. "step 'p' failed: ..."


def pool_name(kind: str, run_dir: str) -> str:
    """A pool name of this process's run: ``kind``, the run dir's name and a random tag. Every Ray name a
    pool takes (its state actor, its replicas) carries it, so runs that share a cluster never join or
    kill each other's pool (they all took the name "run" before)."""
    return f"{kind}-{run_slug(run_dir)}-{uuid.uuid4().hex[:8]}"


def make_pool(cfg: RunConfig, name: str | None = None) -> ReplicaPool:
    """Connect to Ray and describe the run's vLLM replicas (the caller launches and kills them); the
    pool's name is ``name`` or this run's own (``pool_name``)."""
    connect(cfg.address)
    return ReplicaPool(PoolConfig(replica=ReplicaConfig(
        model=cfg.model, max_model_len=cfg.max_model_len, num_cpus=cfg.cpus_per_replica,
        num_gpus=cfg.gpus_per_replica, tensor_parallel_size=cfg.tensor_parallel_size,
        max_lora_rank=max(8, cfg.lora.rank, cfg.grpo.rank if cfg.reinforces() else 0),
        engine_kwargs=cfg.engine_kwargs, resources=cfg.replica_resources),
        num_replicas=cfg.replicas,
        name=name or pool_name("run", cfg.run_dir)))


def compile_strategy(cfg: RunConfig, spec: ProgramSpec, pool: ReplicaPool, splits: Splits,
                     groups: ModelGroups | None = None) -> dspy.Module:
    """BetterTogether on a fresh program with the pool's LM: ``cfg.strategy`` into ``cfg.run_dir``;
    ``groups``: the run's other models (steps name them; each up only around the steps that use it).

    Returns dspy's result: the best program with ``candidate_programs`` (every strategy prefix),
    ``best_strategy``, ``flag_compilation_error_occurred`` and ``compilation_error``.
    """
    program = spec.program(**cfg.program_args)
    program.set_lm(pool_lm(pool, max_tokens=cfg.max_tokens, stop=stop_for(cfg.adapter)))
    ctx = StepContext(spec.metric, threads=cfg.threads, seed=cfg.seed, prompt=vars(cfg.prompt),
                      weight=dict(train=cfg.lora, lifecycle=cfg.lifecycle, exclude_demos=cfg.exclude_demos,
                                  max_rounds=cfg.w_rounds, storage=cfg.storage), feedback=spec.feedback,
                      grpo=cfg.grpo, models=dict(groups.lms) if groups else {},
                      release=groups.release if groups else None)
    table = cfg.step_table()
    keys = dict.fromkeys(cfg.strategy_keys())
    optimizer = BetterTogether(spec.metric, **{key: build_step(key, table[key], ctx) for key in keys})
    compile_args = {key: table[key]["compile_args"] for key in keys if table[key].get("compile_args")}
    with dspy.context(adapter=make_adapter(cfg.adapter)):  # training rows are written by it too
        return optimizer.compile(program, trainset=splits.train[: cfg.train_size or None],
                                 valset=splits.dev[: cfg.val_size or None], strategy=cfg.strategy,
                                 seed=cfg.seed, num_threads=cfg.threads, run_dir=cfg.run_dir,
                                 optimizer_compile_args=compile_args, fingerprint=cfg.fingerprint(),
                                 around_step=groups.around if groups and groups.pools else None)


def held_out_examples(cfg: RunConfig, splits: Splits) -> list:
    """The test examples a run scores its steps on (``cfg.test_size``: 0 all, -1 none)."""
    if cfg.test_size < 0:
        return []
    if not splits.test:
        logger.warning("program %r has no test split: no held-out scores (a valset score is what the "
                       "optimizer selected on, not evidence)", cfg.program)
    return list(splits.test[: cfg.test_size or None])


def score_steps(cfg: RunConfig, spec: ProgramSpec, test: list, best: dspy.Module) -> dict[str, HeldOut]:
    """Every step's program (``best.candidate_programs``) on ``test``; stored results of the same
    size are reused. Returns strategy prefix -> ``HeldOut``.

    Only a clean result is a score: one with errors (runs that broke, not wrong answers) is neither
    stored nor returned, and a stored one with errors (an older Tandem wrote them) is scored again.

    Raises:
        TooManyErrors: scoring met ``max_errors`` errors (nothing of this scoring is stored).
    """
    if not test:
        return {}
    store = RunStore(cfg.run_dir)
    records = {r.strategy: r for r in store.steps()}
    done = {s: HeldOut.from_dict(r.test) for s, r in records.items()
            if r.test and r.test.get("n") == len(test) and not r.test.get("errors")}
    todo = [c for c in best.candidate_programs if c.strategy not in done and c.strategy in records]
    if todo:
        with dspy.context(adapter=make_adapter(cfg.adapter)), collect_errors() as errors:
            results = score_held_out([c.program for c in todo], test, spec.metric, num_threads=cfg.threads)
        for candidate, result in zip(todo, results):
            if result.errors:
                logger.warning("held-out test '%s' not scored: %d of %d runs failed with an error, not a wrong "
                               "answer (first: %s); nothing stored, a rerun scores it again",
                               candidate.strategy or "baseline", result.errors, result.n,
                               errors.messages[0] if errors.messages else "?")
                continue
            store.write_test(records[candidate.strategy].name, result.as_dict())
            done[candidate.strategy] = result
    for strategy, result in done.items():
        logger.info("held-out test '%s': %.1f%% of %d (%s)", strategy or "baseline", result.score, result.n,
                    result.describe(), extra=FILE_ONLY)  # the console's final table shows them
    return done


def score_after(cfg: RunConfig, spec: ProgramSpec, pool: ReplicaPool, test: list,
                best: dspy.Module) -> dict[str, HeldOut]:
    """``score_steps`` after the strategy ran; after a failed step, only on a pool that still has a
    live replica, and a scoring that breaks then is logged, not raised (the step's error is the
    run's error). Returns what was scored (empty: nothing)."""
    if not best.flag_compilation_error_occurred:
        return score_steps(cfg, spec, test, best)
    if test and not pool.live_replicas():
        logger.warning("held-out test not scored: no replica of the pool is alive after the failed step "
                       "(%s); a rerun of the same command resumes and scores", first_line(best.compilation_error))
        return {}
    try:
        return score_steps(cfg, spec, test, best)
    except TooManyErrors as exc:
        logger.warning("held-out test not scored after the failed step: %s; nothing stored, a rerun scores it", exc)
        return {}


def run(cfg: RunConfig) -> RunOutcome:
    """Run the strategy on the configured program and model; see the module docstring.

    Raises:
        RunDirBusy: another run holds the run dir (nothing is written).
    """
    with hold(cfg.run_dir):  # one writer per run dir, before anything is written
        try:
            outcome = _run(cfg)
        except BaseException:  # failed, or stopped (Ctrl-C and SIGTERM raise Stopped, a KeyboardInterrupt)
            track_run_or_warn(cfg)  # what the run dir holds (its completed steps), then the error or the stop
            raise
        return replace(outcome, tracked=track_run_or_warn(cfg))


def readable(run_dir: str) -> None:
    """Read the run dir's records (``run.json``, every step's ``step.json``) before any replica starts, so a
    damaged one fails the run at once (``DamagedFile`` names the file and the fix), not after a pool launch."""
    if (Path(run_dir) / "run.json").is_file():  # else a new run: nothing to read
        store = RunStore(run_dir)
        store.settings()
        store.steps()


def _run(cfg: RunConfig) -> RunOutcome:
    started = time.perf_counter()
    spec = resolve(cfg.program)
    check_fits(cfg.adapter, spec.program(**cfg.program_args), cfg.max_tokens)
    splits = spec.splits(cfg.seed, **cfg.data_args)
    pool = make_pool(cfg)
    groups = ModelGroups(cfg, lambda name: pool_name(f"run-{name}", cfg.run_dir))
    if cfg.plan_check:
        nodes = nodes_now()
        phases = make_plan(cfg, nodes)
        logger.info("%s", summary(phases, nodes))
        logger.info("plan:\n%s", describe(phases, nodes), extra=FILE_ONLY)
        for warning in warnings(cfg):
            logger.warning("plan: %s", warning)
        check(phases, suggest(cfg, nodes))
    if cfg.storage:
        pull(cfg.storage, cfg.run_dir)
    readable(cfg.run_dir)
    with usage.metered(pool, groups.pools) as meter:
        try:
            pool.launch()
            with evaluators_of(cfg.evaluators):
                best = compile_strategy(cfg, spec, pool, splits, groups)
                groups.kill()  # released after their last step already, unless that step failed
                before_test = meter.costs()
                test = score_after(cfg, spec, pool, held_out_examples(cfg, splits), best)
                test_costs = meter.costs() - before_test
        finally:
            groups.kill()
            pool.kill()
            if cfg.storage and Path(cfg.run_dir, "run.json").is_file():
                push(cfg.run_dir, cfg.storage)  # what was done survives this machine, finished or not
    costs = meter.costs()
    logger.info("spent: %s (held-out test scoring: %s)", costs.describe(), test_costs.describe())
    by_group = meter.by_group()
    for name, spent in by_group.items():
        logger.info("spent by model '%s': %s", name, spent.describe())
    run_dir = Path(cfg.run_dir)
    top = best.candidate_programs[0]
    store = RunStore(run_dir)
    save_program(best, run_dir / "program.json")
    adapters = store.adapter_paths()
    models = {name: pred.lm.model for name, pred in best.named_predictors()}
    store.write_best(BestRecord(
        cfg.program, cfg.program_args, cfg.model, best.best_strategy, top.score, models,
        {m: adapters[m] for m in models.values() if m in adapters}, best.flag_compilation_error_occurred,
        test[best.best_strategy].score if best.best_strategy in test else None,
        {**costs.as_dict(), **({"by_model": {k: v.as_dict() for k, v in by_group.items()}} if by_group else {})},
        test_costs.as_dict()))
    write_report(run_dir, f"Tandem run: {cfg.program} on {cfg.model}, strategy `{cfg.strategy}`",
                 best.best_strategy, best.flag_compilation_error_occurred,
                 valset_size=len(splits.dev[: cfg.val_size or None]))
    if cfg.storage:
        push(run_dir, cfg.storage)
    scores = {c.strategy: c.score for c in best.candidate_programs}
    return RunOutcome(run_dir, best.best_strategy, top.score, scores, best.flag_compilation_error_occurred,
                      time.perf_counter() - started, test, costs=costs, error=best.compilation_error)
