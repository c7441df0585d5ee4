"""Model groups: the pools of the models a run serves beside its student (``models:`` in ``RunConfig``).

Knows each group's pool (named after the run and the group, so runs sharing a cluster never meet),
its LM (what ``teacher:``, ``reflection_model:`` and ``prompt_model:`` of a step name), and its
lifetime: a group no step of the strategy names is never launched; the others are launched just
before the first step that uses them runs and killed right after the last one (``around``), or
within it once its use is done (``release``: a weight step's teacher, before training), so a teacher
does not hold CPUs or GPUs through the training or the steps after it; steps an earlier run completed
launch nothing. The student's lifecycle (relaunch / hotswap, adapters) never touches a group: each
has its own pool. On CPU a group's replicas pin the cores after the student's and the groups' before
it (``cpu_first_core``, wrapping around a node's cores), not core 0 again. Does not know steps'
internals or the student's pool.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import dspy

from actors import PoolConfig, ReplicaConfig, ReplicaPool
from actors.dspy_side.client import router_lm
from actors.inference.router import Router
from engine.adapters.registry import stop_for
from engine.config import RunConfig

logger = logging.getLogger(__name__)


class ModelGroups:
    """The pools of ``cfg.models`` that the strategy uses; see the module docstring.

    Args:
        cfg: the run's config (its ``models:``, ``max_tokens``, ``adapter`` and strategy).
        name_of: group name -> the pool's Ray name (``engine.run.pool_name``).
        engine_factory: the replicas' engine (default vLLM; tests pass a scripted one).
    """

    def __init__(self, cfg: RunConfig, name_of: Callable[[str], str], engine_factory=None):
        uses = cfg.group_uses()
        self.first = {name: min(steps) for name, steps in uses.items() if steps}
        self.last = {name: max(steps) for name, steps in uses.items() if steps}
        self.pools: dict[str, ReplicaPool] = {}
        self.lms: dict[str, dspy.LM] = {}
        self._step: int | None = None  # the step running now (``around``)
        core = cfg.replicas * max(1, int(cfg.cpus_per_replica))  # on CPU, each group's cores after the student's
        for name in self.first:
            group = cfg.models[name]
            pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(
                model=group.model, dtype=group.dtype, max_model_len=group.max_model_len, num_cpus=group.cpus_per_replica,
                cpu_first_core=core,
                num_gpus=group.gpus_per_replica, tensor_parallel_size=group.tensor_parallel_size,
                enable_lora=False, engine_kwargs=group.engine_kwargs, resources=group.replica_resources),
                num_replicas=group.replicas, name=name_of(name)), engine_factory=engine_factory)
            self.pools[name] = pool
            core += group.replicas * max(1, int(group.cpus_per_replica))
            # by the pool's name: the LM exists before the pool is launched and follows it across launches
            router = Router(pool.cfg.name, retries=pool.cfg.request_retries, timeout_s=pool.cfg.request_timeout_s)
            self.lms[name] = router_lm(router, pool.model_id, max_tokens=group.max_tokens or cfg.max_tokens,
                                       stop=stop_for(cfg.adapter))

    @contextlib.contextmanager
    def around(self, index: int, key: str) -> Iterator[None]:
        """Step ``index`` (``key``) runs inside: the groups it uses are up, and those no later step uses are
        killed after it, whether it completed or failed."""
        for name, first in self.first.items():
            if first <= index <= self.last[name] and not self.pools[name].launched:
                logger.info("model group '%s' (%s, %d replica(s)): launching for step %d (%s)", name,
                            self.pools[name].cfg.replica.model, self.pools[name].cfg.num_replicas, index, key)
                self.pools[name].launch()
        self._step = index
        try:
            yield
        finally:
            self._step = None
            for name, last in self.last.items():
                if last <= index:
                    self._release(name, f"after step {index}, the last that uses it")

    def release(self, name: str) -> None:
        """Kill group ``name`` now if the step running is the last that uses it (a weight step calls this
        once its teacher's traces are in, so the teacher's CPUs or GPUs are free for training)."""
        if self._step is not None and self.last.get(name) == self._step:
            self._release(name, f"during step {self._step}, its last use done")

    def _release(self, name: str, when: str) -> None:
        pool = self.pools[name]
        if pool.launched:
            pool.kill()
            logger.info("model group '%s': released %s (%.0f replica-s)", name, when, pool.replica_seconds())

    def kill(self) -> None:
        """Kill every group still up (the run ended, failed or was stopped)."""
        for pool in self.pools.values():
            if pool.launched:
                pool.kill()
