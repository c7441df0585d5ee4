"""``tandem table``: the paper's table — every strategy x seed, scored on the held-out test split.

Knows how to order the strategies so that shared prefixes run once (a strategy's run dir starts
with a copy of the completed steps of the longest strategy already run that is its prefix; the run
store then skips them), which program a strategy ends with (the program after its *last* step, as
in the paper, not the best prefix), the test-set evaluation, and that a strategy whose prefix
failed (e.g. fine-tuning with no passing traces) gets "–" with the reason instead of a score. Each
strategy's test score is stored beside its run (``test.json``, with the settings that made it), so
a rerun with the same output dir and settings resumes; other settings are refused. A cell's model groups
(``engine.groups``: a teacher...) are up only around its steps that use them; a cell that reuses its
prefix's steps launches none for them. The table files
are written by ``engine.table.report``; the finished table is logged to MLflow (``engine.report.tracking``:
one parent run, a nested run per cell). Does not know vLLM or training.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import dspy

from actors.dspy_side import usage
from actors.dspy_side.provider import pool_lm
from engine.adapters.registry import check_fits, make_adapter, stop_for
from engine import strategy as strategies
from engine.config import RunConfig
from engine.table.config import VANILLA, Cell, TableConfig, plan
from engine.evaluate import collect_errors, evaluate_many, evaluators_of
from engine.held_out import score_held_out
from engine.groups import ModelGroups
from engine.run import compile_strategy, make_pool, pool_name
from engine.store.run_store import copy_steps
from engine.report.tracking import track_table_or_warn
from programs.base import ProgramSpec, Splits, resolve

logger = logging.getLogger(__name__)

def run_table(cfg: TableConfig) -> list[Cell]:
    """Run every strategy on every seed on one pool; return the cells (see the module docstring)."""
    spec = resolve(cfg.run.program)
    check_fits(cfg.run.adapter, spec.program(**cfg.run.program_args), cfg.run.max_tokens)
    root = Path(cfg.out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    pool = make_pool(cfg.run, name=pool_name("table", cfg.out_dir))
    cells: list[Cell] = []
    with usage.metered(pool) as meter:
        try:
            with evaluators_of(cfg.run.evaluators):
                _run_cells(cfg, spec, pool, root, cells)
        finally:
            pool.kill()
    logger.info("table spent: %s", meter.costs().describe())
    track_table_or_warn(cfg, cells)  # a failure is one warning: the cells stand
    return cells


def _run_cells(cfg: TableConfig, spec: ProgramSpec, pool, root: Path, cells: list[Cell]) -> None:
    """Every strategy x seed on the pool, appended to ``cells`` as each finishes."""
    pool.launch()
    for seed in cfg.seeds:
        splits = spec.splits(seed, **cfg.run.data_args)
        test = splits.test[: cfg.test_size or None]
        if not test:
            raise ValueError(f"program {cfg.run.program!r} has an empty test split for seed {seed}")
        failed: dict[str, str] = {}  # strategy prefix -> why it has no program
        for name, parent in plan(list(cfg.strategies), cfg.run.step_table()):
            run_cfg = cfg.run.with_overrides(seed=seed, strategy=name if name != VANILLA else "",
                                             run_dir=str(root / f"seed-{seed}" / _slug(name)))
            cells.append(_cell(run_cfg, spec, pool, splits, test, name, parent, failed))
            logger.info("table: seed %d, %s -> test %s", seed, name, cells[-1].test_score)


def _cell(cfg: RunConfig, spec: ProgramSpec, pool, splits: Splits, test: list, name: str,
          parent: str | None, failed: dict[str, str]) -> Cell:
    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    done = run_dir / "test.json"
    settings = json.loads(json.dumps({**cfg.fingerprint(), "test_size": len(test)}, default=str))
    if done.is_file():
        data = json.loads(done.read_text())
        if data.get("settings") != settings:
            changed = sorted(k for k in set(settings) | set(data.get("settings") or {})
                             if settings.get(k) != (data.get("settings") or {}).get(k))
            raise ValueError(f"{done} holds a score made with other settings ({', '.join(changed)}); "
                             "use a new --out or the same settings to resume")
        return Cell(name, cfg.seed, data["test_score"], data["dev_score"], data["reason"], str(run_dir), data["wall_s"],
                    data.get("held_out"))
    steps = [] if name == VANILLA else name.split(strategies.SEP)
    blocked = next((failed[p] for p in (strategies.prefix(steps, i) for i in range(1, len(steps) + 1)) if p in failed),
                   None)
    if blocked:
        return _finish(settings, Cell(name, cfg.seed, None, None, blocked, str(run_dir), 0.0), done)
    if parent is not None:
        _seed_from(run_dir.parent / _slug(parent), run_dir, len(parent.split(strategies.SEP)))
    with dspy.context(adapter=make_adapter(cfg.adapter)):
        if name == VANILLA:
            program = spec.program(**cfg.program_args)
            program.set_lm(pool_lm(pool, max_tokens=cfg.max_tokens, stop=stop_for(cfg.adapter)))
            dev_score = evaluate_many([program], splits.dev[: cfg.val_size or None], spec.metric,
                                      num_threads=cfg.threads, desc="evaluate vanilla on dev")[0]
        else:
            groups = ModelGroups(cfg, lambda group: pool_name(f"table-{group}", cfg.run_dir))
            try:
                result = compile_strategy(cfg, spec, pool, splits, groups)
            finally:
                groups.kill()
            final = {c.strategy: c for c in result.candidate_programs}.get(name)
            if final is None:
                reached = {c.strategy for c in result.candidate_programs}
                first_missing = next(strategies.prefix(steps, i) for i in range(1, len(steps) + 1)
                                     if strategies.prefix(steps, i) not in reached)
                failed[first_missing] = result.compilation_error or f"step '{first_missing}' produced no program"
                return _finish(settings, Cell(name, cfg.seed, None, None, failed[first_missing], str(run_dir),
                                    time.perf_counter() - started), done)
            program, dev_score = final.program, final.score
        with collect_errors() as errors:
            (held,) = score_held_out([program], test, spec.metric, num_threads=cfg.threads, desc=f"'{name}' on test")
    if held.errors:  # runs that broke are not wrong answers: no score to store
        raise RuntimeError(f"'{name}' (seed {cfg.seed}) on test: {held.errors} of {held.n} runs failed with an error "
                           f"(first: {errors.messages[0] if errors.messages else '?'}); nothing stored for this "
                           "cell, a rerun of the same command resumes here")
    cell = Cell(name, cfg.seed, held.score, dev_score, None, str(run_dir), time.perf_counter() - started,
                held.as_dict())
    return _finish(settings, cell, done)


def _finish(settings: dict, cell: Cell, path: Path) -> Cell:
    cell = replace(cell, wall_s=round(cell.wall_s, 1))  # as stored, so a resumed table reads the same cells
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"test_score": cell.test_score, "dev_score": cell.dev_score, "reason": cell.reason,
                               "wall_s": cell.wall_s, "held_out": cell.held_out, "settings": settings}, indent=2))
    tmp.rename(path)
    return cell


def _seed_from(parent_dir: Path, run_dir: Path, parent_steps: int) -> None:
    """Copy the parent strategy's completed steps and their adapters into a new run dir."""
    if run_dir.exists():
        return  # an earlier, interrupted attempt: the run store resumes it
    run_dir.mkdir(parents=True)
    copy_steps(parent_dir, run_dir, parent_steps + 1)


def _slug(name: str) -> str:
    return VANILLA if name == VANILLA else name.replace(strategies.SEP, "-")
