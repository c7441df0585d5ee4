"""``TandemReinforceJob``: dspy 3.4.1's ``ReinforceJob`` contract on a Tandem pool, for ``dspy.GRPO``.

What ``dspy.GRPO`` calls, and what happens here: ``lm.reinforce(train_kwargs)`` builds the job and
calls ``initialize()`` (the pool is launched; a ``actors.training.grpo.Learner`` starts in a Ray
actor that keeps the LoRA policy and its optimizer for the whole run: no Ray Train start per step);
``get_status()`` offers ``groups_per_step`` pending batch ids; GRPO's rollouts run on the pool's
replicas through the program's own LM (GRPO turns the cache off; the sampling temperature is the
LM's); ``step(groups)`` runs one learner update, saves the adapter as a new version
(``<base>:grpo-<job>-v<n>``), hot-loads it into every replica, points the LM (the object the
program's predictors hold, as GRPO expects: it updates the LM in place) at it and unloads the
previous version, so the next batch of rollouts samples from the new policy; ``save_checkpoint``
writes the adapter under a name; ``terminate()`` stops the learner and leaves the last version served.
Each step's metrics (reward mean/std, zero-variance groups, loss, KL, tokens, rollout, learn and sync
seconds)
are kept in ``history`` and logged. ``train_kwargs``: ``GRPOConfig``'s fields, ``groups_per_step``,
``learner_cpus``, ``learner_gpus``; dspy's own ``num_generations`` is accepted and only recorded.

Knows dspy's ReinforceJob/GRPO data contract and the pool's adapter calls; does not know programs,
run dirs or strategies. Not known yet: resuming a killed job from a checkpoint (the learner's
optimizer state is not saved), several learner workers (DDP/ZeRO).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Callable

from dspy.clients.provider import ReinforceJob
from dspy.clients.utils_finetune import TrainDataFormat

from actors import models
from actors.training.grpo import GRPOConfig, Learner

logger = logging.getLogger(__name__)

JOB_KEYS = {"groups_per_step": 4, "learner_cpus": 1.0, "learner_gpus": 0.0, "num_generations": None}
_jobs = itertools.count(1)


def ray_learner(model_path: str, cfg: GRPOConfig, cpus: float, gpus: float):
    """A ``Learner`` in a Ray actor (its model and optimizer live there between steps); calls return refs."""
    import ray

    return ray.remote(Learner).options(num_cpus=cpus, num_gpus=gpus).remote(model_path, cfg)


def _is_actor(learner) -> bool:
    """Whether ``learner`` is a Ray actor handle (``ray_learner``'s) rather than an in-process ``Learner``."""
    return hasattr(getattr(learner, "step", None), "remote")


def _call(learner, method: str, *args):
    """A learner call, on a Ray actor (``ray.get`` of the ref) or an in-process ``Learner``."""
    if _is_actor(learner):
        import ray

        return ray.get(getattr(learner, method).remote(*args))
    return getattr(learner, method)(*args)


class TandemReinforceJob(ReinforceJob):
    """dspy's ReinforceJob for ``TandemProvider`` (see the module docstring).

    Args:
        lm: the student's LM (a ``pool_lm`` with this provider); updated in place after each step.
        train_kwargs: ``GRPOConfig`` fields and the job keys (``JOB_KEYS``).
        learner_factory: ``(model_path, cfg, cpus, gpus) -> learner``; default a Ray actor (``ray_learner``).

    Raises:
        ValueError: unknown ``train_kwargs``, or ``lm.model`` is not the pool's base model.
    """

    def __init__(self, lm, train_kwargs: dict[str, Any] | None = None,
                 learner_factory: Callable[..., Any] | None = None):
        super().__init__(lm, dict(train_kwargs or {}))
        self.provider = lm.provider
        self.pool = self.provider.pool
        fields = {f.name for f in dataclasses.fields(GRPOConfig)}
        unknown = sorted(set(self.train_kwargs) - fields - set(JOB_KEYS))
        if unknown:
            raise ValueError(f"unknown GRPO train_kwargs {unknown}; valid: {sorted(fields | set(JOB_KEYS))}")
        self.cfg = dataclasses.replace(self.provider.grpo, **{k: v for k, v in self.train_kwargs.items()
                                                              if k in fields})
        self.options = {k: self.train_kwargs.get(k, v) for k, v in JOB_KEYS.items()}
        if int(self.options["groups_per_step"]) < 1:
            raise ValueError(f"groups_per_step must be >= 1, got {self.options['groups_per_step']}")
        if lm.model != self.pool.model_id:
            raise ValueError(f"GRPO starts from the pool's base model {self.pool.model_id!r}; got {lm.model!r} "
                             "(starting from a fine-tuned adapter is not supported yet)")
        self.learner_factory = learner_factory or ray_learner
        self.learner = None
        self.job_id = f"grpo-{next(_jobs):02d}"
        self.next_batch = 0
        self.version = 0
        self.history: list[dict] = []
        self.state = "created"
        getattr(self.provider, "reinforce_jobs", []).append(self)

    def initialize(self) -> None:
        """Launch the pool (no-op when up) and start the learner."""
        self.pool.launch()
        model_path = str(models.resolve(self.pool.cfg.replica.model))
        self.learner = self.learner_factory(model_path, self.cfg, float(self.options["learner_cpus"]),
                                            float(self.options["learner_gpus"]))
        self.state = "running"
        self._since = time.perf_counter()  # the rollouts of a step run between two ``step`` calls
        logger.info("GRPO job %s: learner up for %s (lr %g, beta %g, loss %s, %d group(s) per step)", self.job_id,
                    self.pool.model_id, self.cfg.lr, self.cfg.beta, self.cfg.loss, self.options["groups_per_step"])

    def get_status(self) -> dict:
        """dspy's ``GRPOStatus``: the batch ids the next ``step`` takes (``groups_per_step`` of them)."""
        pending = list(range(self.next_batch, self.next_batch + int(self.options["groups_per_step"])))
        return {"job_id": self.job_id, "status": self.state, "current_model": self.lm.model,
                "checkpoints": dict(self.checkpoints), "last_checkpoint": self.last_checkpoint,
                "pending_batch_ids": pending if self.state == "running" else []}

    def status(self) -> dict:
        return self.get_status()

    def step(self, train_data: list[dict], train_data_format: TrainDataFormat | str | None = None) -> dict:
        """One learner update from GRPO groups, then the new adapter on every replica; the step's metrics.

        Raises:
            ValueError: not GRPO chat data, or the job is not running.
        """
        if str(getattr(train_data_format, "value", train_data_format)) != TrainDataFormat.GRPO_CHAT.value:
            raise ValueError(f"a GRPO step takes {TrainDataFormat.GRPO_CHAT.value!r} data, got {train_data_format!r}")
        if self.state != "running":
            raise ValueError(f"GRPO job {self.job_id} is {self.state}; initialize() it first")
        rollout_s = time.perf_counter() - self._since
        metrics = _call(self.learner, "step", train_data)
        self.next_batch = max([self.next_batch - 1, *(int(g["batch_id"]) for g in train_data)]) + 1
        self.version += 1
        name = f"{self.pool.model_id}:{self.job_id}-v{self.version}"
        started = time.perf_counter()
        path = _call(self.learner, "save", str(self.provider.adapter_root / f"{self.job_id}-v{self.version}"))
        self.pool.load_adapter(name, path)
        previous, self.lm.model = self.lm.model, name
        if previous != self.pool.model_id:
            self.pool.unload_adapter(previous)
        metrics.update(model=name, sync_s=time.perf_counter() - started, rollout_s=rollout_s)
        self._since = time.perf_counter()
        self.history.append(metrics)
        logger.info("GRPO %s step %d: reward %.3f ± %.3f, %d/%d group(s) without variance, loss %.4f, kl %.4f, "
                    "rollouts %.1fs, learn %.1fs, adapter on every replica in %.1fs", self.job_id, metrics["step"],
                    metrics["reward_mean"], metrics["reward_std"], metrics["zero_variance_groups"], metrics["groups"],
                    metrics["loss"], metrics["kl"], rollout_s, metrics["seconds"], metrics["sync_s"])
        return metrics

    def save_checkpoint(self, checkpoint_name: str) -> str:
        """Write the current adapter under ``checkpoint_name``; its path."""
        path = _call(self.learner, "save", str(self.provider.adapter_root / self.job_id / checkpoint_name))
        self.checkpoints[checkpoint_name] = path
        self.last_checkpoint = checkpoint_name
        return path

    def terminate(self) -> None:
        """Stop the learner; the last version stays served (``lm.model`` names it)."""
        if self.learner is not None and _is_actor(self.learner):
            import ray

            ray.kill(self.learner)
        self.learner = None
        self.state = "terminated"

    def cancel(self) -> None:
        self.terminate()

