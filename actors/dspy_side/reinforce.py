"""``TandemReinforceJob``: dspy 3.4.1's ``ReinforceJob`` contract on a Tandem pool, for ``dspy.GRPO``.

What ``dspy.GRPO`` calls, and what happens here: ``lm.reinforce(train_kwargs)`` builds the job and calls
``initialize()`` (the pool is launched; a ``actors.training.grpo.Learner`` starts in a Ray actor that keeps the
LoRA policy and its optimizer for the whole run: no Ray Train start per step); ``get_status()`` offers
``groups_per_step`` pending batch ids; GRPO's rollouts run on the pool's replicas through the program's own LM
(GRPO turns the cache off; the sampling temperature is the LM's); ``step(groups)`` runs one learner update,
saves the adapter as a new version (``<base>:grpo-<job>-v<n>-<digest>``, 8 hex digits of its weights), hot-loads
it into every replica, points the LM (the object the program's predictors hold, as GRPO expects: it updates the
LM in place) at it and unloads the previous version, so the next batch of rollouts samples from the new policy;
``save_checkpoint`` writes the adapter under a name; ``terminate()`` stops the learner and leaves the last
version served. Each step's metrics (reward mean/std, zero-variance groups, loss, KL, tokens, rollout, learn and
sync seconds) are kept in ``history`` and logged. ``train_kwargs``: ``GRPOConfig``'s fields,
``groups_per_step``, ``learner_cpus``, ``learner_gpus`` (each worker's), ``learner_workers`` (N > 1: a
data-parallel ``actors.training.learner_group.LearnerGroup`` of N ranks, every update's gradient summed over
them); dspy's own ``num_generations`` is accepted and only recorded.

Beyond dspy's contract (for Tandem's ``g`` step, ``engine.steps.grpo``): ``sync_every`` N > 1 puts a new version
on the replicas only every N updates (the rollouts between are off-policy by up to N-1 updates; the learner
weighs their tokens by the clipped importance ratio against the version they came from); ``state_dir``
checkpoints the whole learner after every update (``Learner.save_state``) with the job's history, and a job
built on the same ``state_dir`` resumes from it (the learner's adapter, optimizer moments and step count; the
version it had is served again); an LM that names one of the pool's adapters (a weight step's) is the policy the
learner starts from — that adapter is never unloaded, only the job's own versions are.

Knows dspy's ReinforceJob/GRPO data contract and the pool's adapter calls; does not know programs,
run dirs or strategies.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from dspy.clients.provider import ReinforceJob
from dspy.clients.utils_finetune import TrainDataFormat

from actors import models
from actors.training.grpo import GRPOConfig, Learner, saved_state

logger = logging.getLogger(__name__)

JOB_KEYS = {"groups_per_step": 4, "learner_cpus": 1.0, "learner_gpus": 0.0, "learner_workers": 1, "sync_every": 1,
            "num_generations": None}
HISTORY_FILE = "history.json"  # the job's per-update metrics, in its state_dir
_jobs = itertools.count(1)


def ray_learner(model_path: str, cfg: GRPOConfig, cpus: float, gpus: float, init: str | None = None,
                workers: int = 1):
    """A ``Learner`` in a Ray actor (its model and optimizer live there between steps; calls return refs), or for
    ``workers`` > 1 a ``LearnerGroup`` of that many ranks, each reserving ``cpus`` and ``gpus``. Ray gives an actor
    as many torch threads as CPUs it reserves (one for none): ``cfg.threads`` 0 asks for that many, or, when it
    reserves none, for the node's cores shared by the workers."""
    import os

    import ray

    if not cfg.threads:
        cfg = dataclasses.replace(cfg, threads=int(cpus) if cpus >= 1 else max(1, (os.cpu_count() or 1) // workers))
    if workers > 1:
        from actors.training.learner_group import LearnerGroup

        return LearnerGroup(model_path, cfg, workers, cpus, gpus, init)
    return ray.remote(Learner).options(num_cpus=cpus, num_gpus=gpus).remote(model_path, cfg, init)


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
        learner_factory: ``(model_path, cfg, cpus, gpus, init, workers) -> learner``; default ``ray_learner``.
        job_id: names the versions (``<base>:<job_id>-v<n>-<digest>``); default ``grpo-NN``, numbered in this
            process.
        adapter_root: where the versions are written; default the provider's.
        state_dir: checkpoint the learner here after every update and resume from it (see the module docstring).

    Raises:
        ValueError: unknown ``train_kwargs``, or ``lm.model`` is neither the pool's base model nor one of its adapters.
    """

    def __init__(self, lm, train_kwargs: dict[str, Any] | None = None,
                 learner_factory: Callable[..., Any] | None = None, *, job_id: str | None = None,
                 adapter_root: str | Path | None = None, state_dir: str | Path | None = None):
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
        for key in ("groups_per_step", "sync_every", "learner_workers"):
            if int(self.options[key]) < 1:
                raise ValueError(f"{key} must be >= 1, got {self.options[key]}")
        if self.cfg.zero_stage and int(self.options["learner_workers"]) < 2:
            raise ValueError(f"zero_stage {self.cfg.zero_stage} shards over learner workers: set learner_workers >= 2 "
                             f"(got {self.options['learner_workers']}) or zero_stage 0")
        self.start = self._start_adapter(lm.model)
        self.learner_factory = learner_factory or ray_learner
        self.learner = None
        self.job_id = job_id or f"grpo-{next(_jobs):02d}"
        self.adapter_root = Path(adapter_root) if adapter_root else self.provider.adapter_root
        self.state_dir = Path(state_dir) if state_dir else None
        self.next_batch = 0
        self.version = 0  # learner updates so far
        self.served = 0  # the version the replicas serve (0: the starting policy)
        self.history: list[dict] = []
        self.state = "created"
        getattr(self.provider, "reinforce_jobs", []).append(self)

    def _start_adapter(self, model: str) -> str | None:
        """The adapter path the policy starts from: None for the base model, else the pool's adapter ``model``."""
        if model == self.pool.model_id:
            return None
        paths = {a.name: a.path for a in self.pool.adapter_records()}
        if model not in paths:
            raise ValueError(f"GRPO starts from the pool's base model {self.pool.model_id!r} or one of its adapters "
                             f"({sorted(paths) or 'none loaded'}); got {model!r}")
        return str(paths[model])

    def initialize(self) -> None:
        """Launch the pool (no-op when up) and start the learner: from the ``state_dir`` checkpoint when there
        is one (the version it had is served again), else from the LM's model."""
        self.pool.launch()
        model_path = str(models.resolve(self.pool.cfg.replica.model))
        resume = saved_state(self.state_dir / "learner") if self.state_dir else None
        init = str(resume) if resume else self.start
        self.learner = self.learner_factory(model_path, self.cfg, float(self.options["learner_cpus"]),
                                            float(self.options["learner_gpus"]), init,
                                            int(self.options["learner_workers"]))
        self.state = "running"
        if resume:
            self.version = int(_call(self.learner, "progress"))
            history = self.state_dir / HISTORY_FILE
            self.history = json.loads(history.read_text())[: self.version] if history.is_file() else []
            self.sync()
            logger.info("GRPO job %s: resumed after update %d from %s", self.job_id, self.version, resume)
        self._since = time.perf_counter()  # the rollouts of a step run between two ``step`` calls
        logger.info("GRPO job %s: learner up for %s (lr %g, beta %g, loss %s, %d group(s) per step, sync every %d)",
                    self.job_id, self.lm.model, self.cfg.lr, self.cfg.beta, self.cfg.loss,
                    self.options["groups_per_step"], self.options["sync_every"])

    def get_status(self) -> dict:
        """dspy's ``GRPOStatus``: the batch ids the next ``step`` takes (``groups_per_step`` of them)."""
        pending = list(range(self.next_batch, self.next_batch + int(self.options["groups_per_step"])))
        return {"job_id": self.job_id, "status": self.state, "current_model": self.lm.model,
                "checkpoints": dict(self.checkpoints), "last_checkpoint": self.last_checkpoint,
                "pending_batch_ids": pending if self.state == "running" else []}

    def status(self) -> dict:
        return self.get_status()

    def step(self, train_data: list[dict], train_data_format: TrainDataFormat | str | None = None, *,
             extra: dict | None = None) -> dict:
        """One learner update from GRPO groups, then (every ``sync_every`` updates) the new adapter on every
        replica; the update's metrics, with ``extra`` (the caller's figures for it) merged in.

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
        sync_s = self.sync() if self.version % int(self.options["sync_every"]) == 0 else 0.0
        metrics.update(model=self.lm.model, sync_s=sync_s, rollout_s=rollout_s, **(extra or {}))
        self.history.append(metrics)
        if self.state_dir is not None:
            self._checkpoint()
        self._since = time.perf_counter()
        logger.info("GRPO %s step %d: reward %.3f ± %.3f, %d/%d group(s) without variance, loss %.4f, kl %.4f, "
                    "rollouts %.1fs, learn %.1fs, adapter on every replica in %.1fs", self.job_id, metrics["step"],
                    metrics["reward_mean"], metrics["reward_std"], metrics["zero_variance_groups"], metrics["groups"],
                    metrics["loss"], metrics["kl"], rollout_s, metrics["seconds"], metrics["sync_s"])
        return metrics

    def sync(self) -> float:
        """Put the learner's current version on every replica (no-op when they serve it) and point the LM at it;
        the previous version of this job is unloaded. The seconds it took."""
        if self.served == self.version:
            return 0.0
        from actors.dspy_side.finetune import weights_digest

        started = time.perf_counter()
        path = _call(self.learner, "save", str(self.adapter_root / f"{self.job_id}-v{self.version}"))
        name = f"{self._name(self.version)}-{weights_digest(path)}"  # several runs on one pool (a table's seeds)
        self.pool.load_adapter(name, path)
        _call(self.learner, "mark_served")  # the next rollouts sample this version: weighted against it if stale
        previous, self.lm.model, self.served = self.lm.model, name, self.version
        if previous.startswith(self._name("")) and previous != name:  # never the adapter the policy started from
            self.pool.unload_adapter(previous)
        return time.perf_counter() - started

    def _name(self, version) -> str:
        return f"{self.pool.model_id}:{self.job_id}-v{version}"

    def _checkpoint(self) -> None:
        """The learner's state and the history, in ``state_dir`` (each written whole, then moved into place)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        _call(self.learner, "save_state", str(self.state_dir / "learner"))
        tmp = self.state_dir / (HISTORY_FILE + ".tmp")
        tmp.write_text(json.dumps(self.history, indent=1))
        os.replace(tmp, self.state_dir / HISTORY_FILE)

    def save_checkpoint(self, checkpoint_name: str) -> str:
        """Write the current adapter under ``checkpoint_name``; its path."""
        path = _call(self.learner, "save", str(self.adapter_root / self.job_id / checkpoint_name))
        self.checkpoints[checkpoint_name] = path
        self.last_checkpoint = checkpoint_name
        return path

    def terminate(self) -> None:
        """Stop the learner; the last version stays served (``lm.model`` names it)."""
        if self.learner is not None and _is_actor(self.learner):
            import ray

            from actors.training.learner_group import gone

            ray.kill(self.learner)
            gone(self.learner)
        elif hasattr(self.learner, "stop"):  # a LearnerGroup's workers
            self.learner.stop()
        self.learner = None
        self.state = "terminated"

    def cancel(self) -> None:
        self.terminate()

