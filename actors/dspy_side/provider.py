"""``TandemProvider``: a dspy ``Provider`` (launch / kill / finetune) backed by a pool and Ray Train.

With it, unmodified ``dspy.BetterTogether`` / ``dspy.BootstrapFinetune`` code runs on Tandem by
changing only ``provider=``: ``lm.launch()`` brings the pool up serving ``lm.model`` (the base
model or an adapter this provider trained), ``lm.kill()`` stops the replicas in the ``relaunch``
lifecycle (the paper's: free the accelerators for training) and keeps them in ``hotswap``, and
``lm.finetune(...)`` writes dspy's chat rows as Parquet, trains a LoRA adapter with Ray Train
(``actors.dspy_side.finetune``), serves it, and resolves the job to an LM addressing the new adapter id;
``lm.reinforce(...)`` (what ``dspy.GRPO`` calls) gives a ``TandemReinforceJob``
(``actors.dspy_side.reinforce``): a learner that stays up and a new adapter on every replica per step.
Fine-tune jobs run one at a time: dspy starts each ``finetune`` in its own thread, and two jobs
at once would kill/relaunch the same pool and compete for its cores, so a lock serializes them
(input checks run before it; a second job waits for the first). Knows dspy's
Provider/TrainingJob contract and dspy-style ``train_kwargs`` names; does not know programs or
traces.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

from dspy.clients.provider import Provider, TrainingJob
from dspy.clients.utils_finetune import TrainDataFormat

from actors.dspy_side.client import router_lm
from actors.dspy_side.finetune import LIFECYCLES, FinetuneResult, finetune
from actors.dspy_side.reinforce import TandemReinforceJob
from actors.training.grpo import GRPOConfig
from actors.training.config import LoraTrainConfig
from actors.inference.pool import ReplicaPool
from actors.inference.router import Router
from actors.training.rows import write_rows

logger = logging.getLogger(__name__)

# dspy LocalProvider's train_kwargs names -> LoraTrainConfig fields
ALIASES = {"num_train_epochs": "epochs", "learning_rate": "lr", "max_seq_length": "max_seq_len",
           "per_device_train_batch_size": "micro_batch_size", "lora_r": "rank", "lora_alpha": "alpha",
           "lora_dropout": "dropout"}


class TandemTrainingJob(TrainingJob):
    """dspy's training future; ``status()`` says where the job is."""

    def status(self) -> str:
        if not self.done():
            return "running"
        return "failed" if isinstance(self.result(), Exception) else "succeeded"


class TandemProvider(Provider):
    """Launch, kill and fine-tune a Tandem pool's LM through dspy's provider interface.

    Args:
        pool: the pool whose base model is served and fine-tuned (launched or not).
        train: LoRA settings; a job's ``train_kwargs`` override fields by name (or dspy alias).
        lifecycle: 'relaunch' (``kill()`` stops the replicas) or 'hotswap' (they keep serving).
        adapter_root: where adapters are written; default a new temporary directory.
        grpo: the GRPO learner's settings for ``lm.reinforce`` (``dspy.GRPO``); a job's ``train_kwargs``
            override fields by name.

    Example:
        >>> lm = TandemProvider(pool, lifecycle="hotswap").lm(max_tokens=150)  # doctest: +SKIP
        >>> program.set_lm(lm)  # doctest: +SKIP
        >>> dspy.BetterTogether(metric=metric).compile(program, trainset=train)  # doctest: +SKIP
    """

    def __init__(self, pool: ReplicaPool, train: LoraTrainConfig | None = None, lifecycle: str = "relaunch",
                 adapter_root: str | Path | None = None, grpo: GRPOConfig | None = None):
        super().__init__()
        if lifecycle not in LIFECYCLES:
            raise ValueError(f"lifecycle must be one of {LIFECYCLES}, got {lifecycle!r}")
        self.finetunable = True
        self.TrainingJob = TandemTrainingJob
        self.reinforceable = True  # dspy.GRPO: actors.dspy_side.reinforce
        self.ReinforceJob = TandemReinforceJob
        self.grpo = grpo or GRPOConfig()
        self.reinforce_jobs: list[TandemReinforceJob] = []  # every job's ``history`` (per-step metrics)
        self.pool = pool
        self.train = train or LoraTrainConfig()
        self.lifecycle = lifecycle
        self._adapter_root = Path(adapter_root) if adapter_root else None
        self.trained: dict[str, str] = {}  # adapter id -> path
        self._jobs = itertools.count(1)
        self._finetune_lock = threading.Lock()  # one fine-tune job at a time

    @property
    def adapter_root(self) -> Path:
        """Where this provider's jobs write adapters (a new temporary dir unless given, made on first use)."""
        if self._adapter_root is None:
            self._adapter_root = Path(tempfile.mkdtemp(prefix="tandem-adapters-"))
        return self._adapter_root

    def train_adapters(self, datasets: Mapping[str, str | Path], train: LoraTrainConfig, *, lifecycle: str,
                       adapter_root: str | Path, prefix: str, storage: str | Path) -> dict[str, FinetuneResult]:
        """``actors.dspy_side.finetune.finetune`` on this provider's pool, one job at a time (see the module docstring).

        The one fine-tune path: dspy's ``lm.finetune`` (``finetune`` below) and Tandem's weight step
        both come here.
        """
        if self._finetune_lock.locked():
            logger.info("fine-tune job waits for the one running on pool %s", self.pool.cfg.name)
        with self._finetune_lock:
            results = finetune(self.pool, datasets, train, lifecycle=lifecycle, adapter_root=adapter_root,
                               prefix=prefix, storage=storage)
            self.trained.update({r.name: r.path for r in results.values()})
            return results

    @classmethod
    def of(cls, pool: ReplicaPool) -> TandemProvider:
        """The pool's own provider, made on first use and kept on ``pool.provider`` (what ``pool_lm``
        gives every LM of the pool, so their fine-tune jobs share one lock)."""
        if pool.provider is None:
            pool.provider = cls(pool)
        return pool.provider

    def lm(self, model: str | None = None, **kwargs):
        """A ``dspy.LM`` on the pool with this provider (``launch``/``kill``/``finetune`` work on it)."""
        return pool_lm(self.pool.cfg.name, model or self.pool.model_id, provider=self, **kwargs)

    def launch(self, lm, launch_kwargs: dict[str, Any] | None = None) -> None:
        """Bring the pool up (no-op when running) serving ``lm.model``.

        Raises:
            ValueError: ``lm.model`` is neither the pool's base model nor an adapter it serves or
                this provider trained.
        """
        self.pool.launch()
        model = lm.model
        if model == self.pool.model_id or model in self.pool.adapters():
            return
        if model not in self.trained:
            raise ValueError(f"{model!r} is not served by pool {self.pool.cfg.name!r} (base "
                             f"{self.pool.model_id!r}, adapters {self.pool.adapters()}) nor trained by this provider")
        self.pool.load_adapter(model, self.trained[model])

    def kill(self, lm, launch_kwargs: dict[str, Any] | None = None) -> None:
        """Stop the replicas ('relaunch'); keep them serving ('hotswap'). Safe when already stopped."""
        if self.lifecycle == "relaunch" and self.pool.launched:
            self.trained.update({a.name: a.path for a in self.pool.adapter_records()})
            self.pool.kill()

    def finetune(self, job: TrainingJob, model: str, train_data: list[dict[str, Any]],
                 train_data_format: TrainDataFormat | str | None, train_kwargs: dict[str, Any] | None = None) -> str:
        """Train a LoRA adapter of the pool's base model on dspy chat rows; return its new model id.

        Concurrent calls (dspy runs each job in a thread) train one after another.

        Raises:
            ValueError: not chat data, no rows, a model that is not this pool's, unknown train_kwargs.
        """
        if str(getattr(train_data_format, "value", train_data_format)) != TrainDataFormat.CHAT.value:
            raise ValueError(f"TandemProvider fine-tunes on chat data only, got format {train_data_format!r}")
        if not train_data:
            raise ValueError("no training data: the program passed the metric on no training example")
        base = model.split(":ft-")[0]
        if base != self.pool.model_id:
            raise ValueError(f"model {model!r} is not pool {self.pool.cfg.name!r}'s base model {self.pool.model_id!r}")
        cfg = self._train_config(train_kwargs or {})
        index = next(self._jobs)
        work = self.adapter_root / f"job-{index:02d}"
        work.mkdir(parents=True, exist_ok=True)
        write_rows(({"messages": row["messages"]} for row in train_data), work / "train.parquet")
        result = self.train_adapters({"": work / "train.parquet"}, cfg, lifecycle=self.lifecycle,
                                     adapter_root=self.adapter_root, prefix=f"ft-p{index:02d}",
                                     storage=work / "ray_train")[""]
        return result.name

    def _train_config(self, train_kwargs: dict[str, Any]) -> LoraTrainConfig:
        valid = {f.name for f in dataclasses.fields(LoraTrainConfig)}
        changes = {ALIASES.get(k, k): v for k, v in train_kwargs.items()}
        unknown = sorted(k for k in train_kwargs if ALIASES.get(k, k) not in valid)
        if unknown:
            raise ValueError(f"unknown train_kwargs {unknown}; valid: {sorted(valid | set(ALIASES))}")
        return dataclasses.replace(self.train, **changes)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_finetune_lock"}  # a lock does not pickle

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._finetune_lock = threading.Lock()

    def __deepcopy__(self, memo) -> "TandemProvider":
        return self  # programs are deep-copied by optimizers; the provider (and its pool) is shared


def pool_lm(pool: ReplicaPool | str, model: str | None = None, **kwargs):
    """A ``dspy.LM`` served by a pool.

    Args:
        pool: a ``ReplicaPool`` (its provider, ``TandemProvider.of(pool)``, becomes the LM's unless
            ``provider=`` is given: ``lm.launch()/kill()/finetune()`` work and the weight step finds the
            pool through it), or a pool name (a pool launched elsewhere in the same Ray namespace; such
            an LM generates but cannot be fine-tuned).
        model: the base model id or an adapter name; default the pool's base model.
        **kwargs: more ``dspy.LM`` arguments (``temperature``, ``max_tokens``, ``cache``,
            ``num_retries``, ``provider`` …).

    Returns:
        A ``dspy.LM`` whose calls run on the pool's replicas.

    Raises:
        ValueError: a pool given by name without ``model``.

    Example:
        >>> lm = pool_lm(pool, max_tokens=150)  # doctest: +SKIP
        >>> dspy.Predict("question -> answer", lm=lm)(question="2 + 2?")  # doctest: +SKIP
    """
    if isinstance(pool, str):
        if not model:
            raise ValueError("give model= when the pool is given by name")
        return router_lm(Router(pool), model, **kwargs)
    kwargs.setdefault("provider", TandemProvider.of(pool))
    return router_lm(pool.router, model or pool.model_id, **kwargs)
