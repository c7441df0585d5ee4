"""``WeightStep``: the paper's BootstrapFinetune — traces, vanilla-prompt chat data, LoRA, new model id.

Knows the step's data flow: bootstrap traces on the trainset with the current prompts, in
parallel; keep only runs that pass the metric; turn every predictor call into a chat row with
the *vanilla* prompt (no demos); write them as Parquet in the step dir; fine-tune one LoRA
adapter for the pool's LM with Ray Train; then the lifecycle — ``relaunch`` (the paper's: kill
the replicas to free the accelerators, train, relaunch them serving the adapter) or ``hotswap``
(train on other resources and load the adapter into the live replicas). The adapter gets a new,
unique model id (``base:ft-<step>-<hash>``), so DSPy's cache never returns the old answers.
Zero passing traces is an error that says so and why. Does not know strategies or the run dir
layout beyond the ``step_dir`` and ``adapter_root`` it is given.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Callable

import dspy
from dspy.teleprompt.teleprompt import Teleprompter

from actors import models
from actors.client import PoolEngine
from actors.lora_train import LoraTrainConfig, train_lora, write_rows
from actors.pool import ReplicaPool
from engine.bootstrap import bootstrap, chat_rows

logger = logging.getLogger(__name__)

LIFECYCLES = ("relaunch", "hotswap")


class NoTrainingDataError(RuntimeError):
    """The program passed the metric on no training example: there is nothing to fine-tune on."""


class WeightStep(Teleprompter):
    """Bootstrap traces and fine-tune a LoRA adapter of the program's pool LM.

    Args:
        metric: ``metric(example, prediction, trace)``; a trace is kept only when it passes.
        train: LoRA and optimisation settings (paper defaults).
        lifecycle: 'relaunch' or 'hotswap' (see module docstring).
        num_threads: concurrent LM calls while bootstrapping.

    Example:
        >>> step = WeightStep(metric, LoraTrainConfig(epochs=2), lifecycle="relaunch")  # doctest: +SKIP
        >>> tuned = step.compile(program, trainset=train)  # doctest: +SKIP
    """

    def __init__(self, metric: Callable, train: LoraTrainConfig | None = None, lifecycle: str = "relaunch",
                 num_threads: int = 16):
        if lifecycle not in LIFECYCLES:
            raise ValueError(f"lifecycle must be one of {LIFECYCLES}, got {lifecycle!r}")
        self.metric = metric
        self.train = train or LoraTrainConfig()
        self.lifecycle = lifecycle
        self.num_threads = num_threads
        self.step_dir: Path | None = None  # set by BetterTogether for each run of the step
        self.adapter_root: Path | None = None
        self.step_index = 0
        self.last_run: dict = {}

    def compile(self, student: dspy.Module, *, trainset: list, teacher=None, valset=None) -> dspy.Module:
        """Fine-tune on ``trainset`` traces; ``teacher``/``valset`` are accepted and unused (as in dspy)."""
        pool = pool_of(student)
        step_dir = Path(self.step_dir or tempfile.mkdtemp(prefix="tandem-w-"))
        adapter_root = Path(self.adapter_root or step_dir)
        step_dir.mkdir(parents=True, exist_ok=True)
        result = bootstrap(student, trainset, self.metric, num_threads=self.num_threads, desc="bootstrap traces")
        rows = chat_rows(student, result.traces)
        if not rows:
            raise NoTrainingDataError(
                f"no passing traces: the program passed the metric on 0 of {result.attempted} training examples "
                f"({result.failed_calls} runs failed to run or parse, e.g. {result.errors[:1]}); "
                "fine-tuning has no data. Run a prompt step first (e.g. 'p -> w') or check the metric.")
        data_path = step_dir / "traces.parquet"
        write_rows(rows, data_path)
        logger.info("weight step: %d chat rows from %d passing traces of %d examples", len(rows),
                    len(result.traces), result.attempted)
        staging = adapter_root / f".staging-{self.step_index:02d}"
        trained = self._train(pool, data_path, staging, step_dir)
        name = f"{pool.model_id}:ft-{self.step_index:02d}-{_digest(staging)}"
        final = adapter_root / name.replace(":", "_")
        if final.exists():
            import shutil

            shutil.rmtree(final)
        staging.rename(final)
        pool.load_adapter(name, str(final))  # live replicas (hotswap) or the relaunched ones
        self.last_run = {"adapter": name, "adapter_path": str(final), "rows": len(rows),
                         "passing_traces": len(result.traces), "attempted": result.attempted,
                         "train_metrics": trained.metrics, "lifecycle": self.lifecycle}
        return with_model(student, pool, name)

    def _train(self, pool: ReplicaPool, data_path: Path, out: Path, step_dir: Path):
        model_path = models.resolve(pool.cfg.replica.model)
        storage = str((step_dir / "ray_train").resolve())
        if self.lifecycle == "hotswap":
            return train_lora(self.train, model_path, str(data_path), str(out), storage)
        adapters = pool.adapter_records()
        pool.kill()  # free the cores / GPUs for training
        try:
            return train_lora(self.train, model_path, str(data_path), str(out), storage)
        finally:
            pool.launch(adapters=adapters)  # serve again, trained or not


def pool_of(program: dspy.Module) -> ReplicaPool:
    """The launched pool every predictor's LM sends its calls to.

    Raises:
        ValueError: a predictor has no LM, or an LM that is not a Tandem pool LM, or LMs of two pools.
    """
    names = set()
    for name, pred in program.named_predictors():
        engine = getattr(pred.lm, "engine", None)
        if not isinstance(engine, PoolEngine):
            raise ValueError(f"predictor {name!r} needs a Tandem pool LM (pool.lm()) for the weight step, "
                             f"got {type(pred.lm).__name__ if pred.lm else 'no LM'}")
        names.add(engine.router.pool_name)
    if len(names) != 1:
        raise ValueError(f"the weight step fine-tunes one pool's LM; predictors use pools {sorted(names)}")
    return ReplicaPool.named(names.pop())


def with_model(program: dspy.Module, pool: ReplicaPool, model_id: str) -> dspy.Module:
    """A copy of ``program`` whose predictors call ``model_id`` (base or adapter) on ``pool``."""
    tuned = program.deepcopy()
    for pred in tuned.predictors():
        pred.lm = pred.lm.copy(model=model_id)
    return tuned


def _digest(adapter_dir: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(adapter_dir.glob("adapter_model.*")):
        digest.update(f.read_bytes())
    return digest.hexdigest()[:8]
