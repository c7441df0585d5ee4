"""``ReplicaPool``: launch, scale, relaunch and kill a set of ``LMReplica`` actors; load adapters.

Knows the lifecycle: each replica gets its own placement group (one bundle per tensor-parallel
worker), is a named, restartable Ray actor (Ray restarts it after a crash, or after it exits
because its vLLM engine died; it then rebuilds its engine and reloads the pool's adapters from
the pool's state actor), and is shut down engine first, then killed, then its placement group
removed, so ``kill()`` leaves nothing behind. A launch that fails half-way (the cluster is too
small, a placement group or a replica not ready in time, an engine that fails to start) stops
every replica and placement group it started and the state actor it created before raising.
Every operation is idempotent. Requests go through ``self.router`` (``actors.inference.router``).
Does not know DSPy (``actors.dspy_side.client``) or what the requests are for (``engine/``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import models, progress
from actors.inference import adapter_files, device
from actors.config import PoolConfig
from actors.errors import AdapterError
from actors.inference.replica import EngineFactory, LMReplica
from actors.inference.router import Router, state_actor_name, wait_healthy
from actors.runtime import cluster_now
from actors.types import Adapter

logger = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_restarts=-1)
class PoolState:
    """The pool's shared truth: the current replicas and the adapters every replica must serve."""

    def __init__(self):
        import uuid

        # (incarnation, counter): a relaunched pool's new state actor never repeats a version
        self._version = (uuid.uuid4().hex, 0)
        self._replicas: list = []
        self._adapters: dict[str, Adapter] = {}

    def set_replicas(self, replicas: list) -> None:
        self._version = (self._version[0], self._version[1] + 1)
        self._replicas = list(replicas)

    def replicas(self) -> tuple[tuple[str, int], list]:
        return self._version, self._replicas

    def add_adapter(self, adapter: Adapter) -> None:
        self._adapters[adapter.name] = adapter

    def remove_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)

    def adapters(self) -> list[Adapter]:
        return list(self._adapters.values())


class ReplicaPool:
    """N vLLM replicas behind one router.

    Args:
        cfg: the pool config.
        engine_factory: engine builder passed to every replica (default vLLM); tests inject a
            scripted engine here.

    Example:
        >>> pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model="tiny-llama")))  # doctest: +SKIP
        >>> with pool.launch():
        ...     pool.router.submit(GenerateRequest("tiny-llama", prompt="Hi")).text
    """

    def __init__(self, cfg: PoolConfig, engine_factory: EngineFactory | None = None):
        self.cfg = cfg
        self._factory = engine_factory
        self._replicas: dict[int, tuple] = {}  # rank -> (handle, placement group)
        self._state = None
        self._router: Router | None = None
        self._generation = 0
        self.provider = None  # a dspy Provider built around this pool (actors.dspy_side); never used here
        self._up_since: dict[int, float] = {}  # rank -> when its start began (replica-seconds)
        self._replica_s = 0.0  # replica-seconds of replicas already stopped

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def launched(self) -> bool:
        return bool(self._replicas)

    @property
    def model_id(self) -> str:
        """The id that addresses the base model."""
        return self.cfg.replica.base_id

    @property
    def router(self) -> Router:
        if self._router is None:
            raise RuntimeError("the pool is not launched; call launch() first")
        return self._router

    def launch(self, model: str | None = None, adapters: Sequence[Adapter] = ()) -> "ReplicaPool":
        """Start the replicas (no-op if running the same model) and load ``adapters`` on all.

        Args:
            model: model to serve; default the config's. A different model relaunches the pool.
            adapters: adapters to serve besides the base model.

        Returns:
            self, usable as a context manager that kills the pool on exit.

        Raises:
            models.ModelError: the model cannot be resolved.
            ValueError: the whole cluster is too small for the replicas.
            TimeoutError: replicas did not become ready within ``start_timeout_s``.
            Any error of a replica's start (e.g. its engine's); nothing the launch started is left.
        """
        if model is not None and model != self.cfg.replica.model:
            if self.launched:
                self.kill()
            self.cfg = replace(self.cfg, replica=replace(self.cfg.replica, model=model, model_id=None))
        if not self.launched:
            models.resolve(self.cfg.replica.model)  # materialize once here, not in every replica
            _check_fits(device.bundles(self.cfg.replica), self.cfg.num_replicas)  # before creating anything
            created = self._open_state()
            try:
                self._router = Router(self.cfg.name, retries=self.cfg.request_retries,
                                      timeout_s=self.cfg.request_timeout_s)
                self._start(range(self.cfg.num_replicas))
            except BaseException:
                self._close_state(kill=created)
                raise
        for adapter in adapters:
            self.load_adapter(adapter.name, adapter.path)
        return self

    def _open_state(self) -> bool:
        """Create (or join) the pool's state actor; True when this call created it."""
        name, namespace = state_actor_name(self.cfg.name), ray.get_runtime_context().namespace
        try:
            ray.get_actor(name, namespace=namespace)
            created = False
        except ValueError:
            created = True
        self._state = PoolState.options(name=name, get_if_exists=True, lifetime=None).remote()
        return created

    def _close_state(self, kill: bool) -> None:
        if kill and self._state is not None:
            ray.kill(self._state)
        if self._router is not None:
            self._router.close()
        self._state, self._router = None, None

    def _start(self, ranks) -> None:
        """Start replicas ``ranks`` and wait until all are healthy; on failure stop every one started."""
        self._generation += 1
        started: dict[int, tuple] = {}
        began = time.monotonic()
        ranks = list(ranks)
        try:
            with progress.bar(f"pool {self.cfg.name}: starting {len(ranks)} replica(s)", len(ranks), "replica") as bar:
                for rank in ranks:
                    started[rank] = self._start_one(rank)
                health = [h.health.remote() for h, _ in started.values()]
                _wait_all(health, time.monotonic() + self.cfg.start_timeout_s, bar)
        except BaseException:
            logger.warning("pool %s: start failed; stopping the %d replica(s) started", self.cfg.name, len(started))
            _stop(*started.values())
            self._replica_s += len(started) * (time.monotonic() - began)
            raise
        self._replicas.update(started)
        self._up_since.update({rank: began for rank in started})
        self._publish()
        logger.info("pool %s: %d replica(s) of %s ready (%.0fs)", self.cfg.name, len(self._replicas),
                    self.cfg.replica.model, time.monotonic() - began)

    def _start_one(self, rank: int) -> tuple:
        rcfg = self.cfg.replica
        bundles = device.bundles(rcfg)
        _check_fits(bundles, self.cfg.num_replicas)
        pg = placement_group(bundles, strategy=self.cfg.placement_strategy)
        try:
            ray.get(pg.ready(), timeout=self.cfg.start_timeout_s)
        except BaseException as exc:
            remove_placement_group(pg)
            if not isinstance(exc, GetTimeoutError):
                raise
            raise TimeoutError(
                f"replica {rank} of pool {self.cfg.name!r} needs {bundles} but the cluster could not place it "
                f"within {self.cfg.start_timeout_s:.0f}s; free now: {ray.available_resources()}") from None
        try:
            return self._create_replica(rank, pg), pg
        except BaseException:
            remove_placement_group(pg)
            raise

    def _create_replica(self, rank: int, pg) -> ray.actor.ActorHandle:
        rcfg = self.cfg.replica
        actor = ray.remote(LMReplica).options(
            name=f"tandem:{self.cfg.name}:{self._generation}:{rank}",
            max_restarts=rcfg.max_restarts,
            max_task_retries=0,  # the router re-sends to another replica; Ray restarts this one
            max_concurrency=1000,
            runtime_env={"env_vars": device.engine_env(rcfg, rank)},
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
            **device.actor_resources(rcfg),
        )
        state = (state_actor_name(self.cfg.name), ray.get_runtime_context().namespace)
        return actor.remote(rcfg, rank, state, self._factory)

    def _publish(self) -> None:
        ray.get(self._state.set_replicas.remote(sorted((r, h) for r, (h, _) in self._replicas.items())))
        self._router.refresh(force=True)

    def scale(self, num_replicas: int) -> None:
        """Grow or shrink to ``num_replicas``; new replicas load the pool's adapters as they start."""
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.cfg = replace(self.cfg, num_replicas=num_replicas)
        if not self.launched:
            return
        current = sorted(self._replicas)
        if num_replicas > len(current):
            free = (r for r in range(10**6) if r not in self._replicas)
            self._start([next(free) for _ in range(num_replicas - len(current))])
        leaving = [self._replicas.pop(rank) for rank in current[num_replicas:]]
        if leaving:
            self._publish()  # the router stops sending to them first
            _stop(*leaving)
            self._down(current[num_replicas:])

    def kill(self) -> None:
        """Stop every replica and its engine, remove the placement groups and the state actor."""
        replicas, self._replicas = self._replicas, {}
        _stop(*replicas.values())
        self._down(list(replicas))
        self._close_state(kill=True)

    def _down(self, ranks) -> None:
        now = time.monotonic()
        self._replica_s += sum(now - self._up_since.pop(rank, now) for rank in ranks)

    def replica_seconds(self) -> float:
        """Replica-seconds so far: each replica from the start of its launch until it was stopped (or now)."""
        now = time.monotonic()
        return self._replica_s + sum(now - t for t in self._up_since.values())

    def relaunch(self, adapter: Adapter | None = None) -> None:
        """Kill and start the replicas again (freeing accelerators meanwhile), serving ``adapter`` too."""
        adapters = self.adapter_records()
        self.kill()
        self.launch(adapters=[*adapters, *([adapter] if adapter else [])])

    def __enter__(self) -> "ReplicaPool":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    # -- adapters ----------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> Adapter:
        """Hot-load a peft adapter into every live replica under ``name`` (unique per version). The same files
        under a name already served (from another path: e.g. two strategies of a table whose weight steps
        trained the same adapter, whose names carry their weights' digest) are that adapter: its record, no load.

        Raises:
            AdapterError: see ``LMReplica.load_adapter``; no replica keeps a half-loaded adapter.
        """
        handles = [h for h, _ in self._replicas.values()]
        if not handles:
            raise AdapterError("the pool is not launched; launch it before loading adapters")
        records = {a.name: a for a in self.adapter_records()}
        known = set(records)
        try:
            packed = adapter_files.pack(path)
        except FileNotFoundError:
            raise AdapterError(f"adapter {name!r}: {path} is not a peft adapter dir (no adapter_config.json)") from None
        served = records.get(name)
        if served is not None and served.files is not None and _files_of(served) == packed:
            return served
        files = ray.put(packed)  # each replica writes its own copy: no shared path needed
        results = _call_all(handles, "load_adapter", name, path, files)  # every replica at once
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            if name not in known:  # roll back a partial load; never touch an adapter already served
                _call_all(handles, "unload_adapter", name)
            raise errors[0]
        record = replace(results[0], path=str(Path(path).resolve()), files=files)  # where it came from
        ray.get(self._state.add_adapter.remote(record))
        return record

    def unload_adapter(self, name: str) -> None:
        """Stop serving an adapter on every replica."""
        ray.get(self._state.remove_adapter.remote(name))
        errors = [r for r in _call_all([h for h, _ in self._replicas.values()], "unload_adapter", name)
                  if isinstance(r, Exception)]
        if errors:
            raise errors[0]

    def adapters(self) -> list[str]:
        """Names of the adapters the pool serves."""
        return sorted(a.name for a in self.adapter_records())

    def adapter_records(self) -> list[Adapter]:
        """The adapters the pool serves, with their paths."""
        return ray.get(self._state.adapters.remote()) if self._state else []

    # -- observability -----------------------------------------------------------------------

    def health(self) -> list[dict]:
        """Each replica's health record (waits for restarting replicas)."""
        return [wait_healthy(h) for h, _ in self._replicas.values()]

    def live_replicas(self, timeout_s: float = 60.0) -> int:
        """How many replicas answer ``health()`` within ``timeout_s`` (a restarting one is waited for;
        one dead for good, or killed with the pool, does not count)."""
        count = 0
        for handle, _ in list(self._replicas.values()):
            try:
                wait_healthy(handle, timeout_s)
                count += 1
            except Exception as exc:  # dead for good, restarting too long: not live either way
                logger.info("pool %s: a replica does not answer: %s", self.cfg.name, type(exc).__name__)
        return count

    def stats(self) -> list[dict]:
        """Each replica's request and token counters and latency percentiles."""
        return [_call(h, "stats") for h, _ in self._replicas.values()]


def _wait_all(refs: list, deadline: float, bar) -> None:
    """``ray.get`` of every ref, counting each on ``bar`` as it finishes; ``GetTimeoutError`` at ``deadline``."""
    while refs:
        ready, refs = ray.wait(refs, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise GetTimeoutError(f"{len(refs)} replica(s) not ready in time")
        ray.get(ready)
        bar.update(len(ready))


def _check_fits(bundles: list[dict], replicas: int) -> None:
    """Fail at once when the whole cluster — at an autoscaler's maximum, where it has one — is too
    small for the pool's replicas (no waiting for resources that will never come)."""
    total, _ = cluster_now()
    for key in {k for b in bundles for k in b}:
        need = sum(b.get(key, 0) for b in bundles)
        if need * replicas > total.get(key, 0):
            raise ValueError(f"{replicas} replica(s) x {need:g} {key} need {need * replicas:g} {key} but the whole "
                             f"cluster has {total.get(key, 0):g}. Lower num_replicas, num_cpus/num_gpus or "
                             f"tensor_parallel_size, or add nodes (or raise the autoscaler's limits).")


def _call(handle, method: str, *args, timeout_s: float = 900.0):
    """Call a replica method, waiting out a restart in progress (Ray answers ActorUnavailable)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(getattr(handle, method).remote(*args))
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _files_of(record: Adapter) -> dict:
    """The packed files of a served adapter's record (an ObjectRef in the pool's state)."""
    return ray.get(record.files) if isinstance(record.files, ray.ObjectRef) else record.files


def _call_all(handles: list, method: str, *args) -> list:
    """``_call`` on every replica at once (the calls overlap: 64 replicas load an adapter in about the time of
    one, where one after the other took 64 times as long); each replica's result, or the exception it raised,
    in the order of ``handles``."""
    refs = []
    for handle in handles:
        try:
            refs.append(getattr(handle, method).remote(*args))
        except Exception as exc:  # a dead actor can refuse the call itself
            refs.append(exc)
    out = []
    for handle, ref in zip(handles, refs):
        try:
            if isinstance(ref, Exception):
                raise ref
            out.append(ray.get(ref))
        except ActorUnavailableError:  # restarting: wait it out as ``_call`` does
            try:
                out.append(_call(handle, method, *args))
            except Exception as exc:
                out.append(exc)
        except Exception as exc:
            out.append(exc)
    return out


def _stop(*replicas: tuple, timeout_s: float = 60.0) -> None:
    """Shut the ``(handle, placement group)`` replicas' engines down, all at once (a pool of 64 stops
    in the time of one), then kill the actors and free their placement groups."""
    pending = {}
    for handle, _ in replicas:
        try:
            pending[handle.shutdown.remote()] = handle
        except Exception as exc:  # already dead: nothing to shut down, still kill and free below
            logger.debug("replica shutdown skipped: %s", exc)
    deadline = time.monotonic() + timeout_s
    for ref in pending:
        try:
            ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except Exception as exc:  # died meanwhile, or hangs: it is killed below either way
            logger.debug("replica shutdown skipped: %s", exc)
    for handle, pg in replicas:
        ray.kill(handle, no_restart=True)
        remove_placement_group(pg)
