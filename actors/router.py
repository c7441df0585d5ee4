"""``Router``: send each request to the least-loaded live replica of a pool; re-send on replica loss.

Knows: the pool's current replicas (read from the pool's state actor, so a router pickled into
another Ray worker finds the replicas of a relaunched pool too), in-flight counts per replica in
this process, and what to do when a replica dies mid-request: mark it down, send the request to
another one, and watch the dead one come back (Ray restarts it; ``max_restarts``). Errors that
the request itself causes (``LMRequestError``) are raised at once and never retried.
Does not start or kill replicas (``actors.pool``) and does not know DSPy (``actors.client``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.errors import PoolUnavailableError
from actors.types import Completion, GenerateRequest

logger = logging.getLogger(__name__)

_REPLICA_LOST = RayActorError  # ActorDiedError and ActorUnavailableError (restarting)
_REFRESH_S = 5.0


def state_actor_name(pool_name: str) -> str:
    """The name of a pool's state actor."""
    return f"tandem-pool:{pool_name}"


def wait_healthy(handle: ray.actor.ActorHandle, timeout_s: float = 900.0) -> dict:
    """Wait until a (possibly restarting) replica answers ``health()``; return its record.

    Raises:
        ray.exceptions.ActorDiedError: the replica is dead for good (no restarts left).
        TimeoutError: it did not come back within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(handle.health.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except ActorUnavailableError:  # restarting: the call raced the restart; ask again
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica not healthy after {timeout_s:.0f}s")
            time.sleep(0.5)


class Router:
    """Routes ``GenerateRequest``s over a pool's replicas.

    Args:
        pool_name: the pool to route to (its state actor is looked up by name).
        namespace: the Ray namespace the pool lives in; default the current one.
        retries: times a request is re-sent after its replica died.

    Example:
        >>> router = Router("default")  # doctest: +SKIP
        >>> router.submit(GenerateRequest("tiny-llama", prompt="Hi", max_tokens=4)).text  # doctest: +SKIP
    """

    def __init__(self, pool_name: str, namespace: str | None = None, retries: int = 3):
        self.pool_name = pool_name
        self.namespace = namespace or ray.get_runtime_context().namespace
        self.retries = retries
        self._init_local()

    def _init_local(self) -> None:
        self._lock = threading.Lock()
        self._version = None
        self._replicas: list[tuple[int, ray.actor.ActorHandle]] = []
        self._checked = 0.0
        self._inflight: dict[int, int] = {}
        self._down: set[int] = set()
        self._turn = itertools.count()

    def __getstate__(self) -> dict:
        return {"pool_name": self.pool_name, "namespace": self.namespace, "retries": self.retries}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_local()

    # -- replica set -------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Re-read the replica set from the pool's state actor (at most every few seconds)."""
        if not force and time.monotonic() - self._checked < _REFRESH_S:
            return
        try:
            state = ray.get_actor(state_actor_name(self.pool_name), namespace=self.namespace)
        except ValueError:
            raise PoolUnavailableError(f"pool {self.pool_name!r} is not running (killed, or never launched)")
        version, replicas = ray.get(state.replicas.remote())
        with self._lock:
            self._checked = time.monotonic()
            if version != self._version:
                self._version, self._replicas = version, list(replicas)
                self._inflight = {rank: self._inflight.get(rank, 0) for rank, _ in replicas}
                self._down &= set(self._inflight)

    def _pick(self, exclude: set[int]) -> tuple[int, ray.actor.ActorHandle]:
        self.refresh()
        with self._lock:
            if not self._replicas:
                raise PoolUnavailableError(f"pool {self.pool_name!r} has no replicas")
            candidates = [r for r in self._replicas if r[0] not in exclude and r[0] not in self._down]
            # All marked down: use any of them; Ray holds the call until the actor has restarted.
            candidates = candidates or [r for r in self._replicas if r[0] not in exclude] or self._replicas
            turn = next(self._turn)
            n = len(candidates)
            rank, handle = min((candidates[(turn + i) % n] for i in range(n)),
                               key=lambda r: self._inflight.get(r[0], 0))
            self._inflight[rank] = self._inflight.get(rank, 0) + 1
            return rank, handle

    def _release(self, rank: int) -> None:
        with self._lock:
            if rank in self._inflight:
                self._inflight[rank] -= 1

    def _lost(self, rank: int, handle: ray.actor.ActorHandle, exc: BaseException) -> None:
        logger.warning("replica %d of pool %s lost mid-request (%s); re-sending elsewhere",
                       rank, self.pool_name, type(exc).__name__)
        with self._lock:
            if rank in self._down:
                return
            self._down.add(rank)
        try:  # the pool may have been relaunched: pick up its new replicas now
            self.refresh(force=True)
        except PoolUnavailableError:
            pass
        threading.Thread(target=self._watch, args=(rank, handle), daemon=True).start()

    def _watch(self, rank: int, handle: ray.actor.ActorHandle) -> None:
        try:
            wait_healthy(handle)
            logger.info("replica %d of pool %s is back", rank, self.pool_name)
        except Exception as exc:  # dead for good: it stays out of rotation
            logger.warning("replica %d of pool %s did not come back: %s", rank, self.pool_name, exc)
            return
        with self._lock:
            self._down.discard(rank)

    def _exhausted(self, request: GenerateRequest, tried: set[int], last: BaseException) -> PoolUnavailableError:
        return PoolUnavailableError(
            f"request for {request.model!r} failed on replicas {sorted(tried)} of pool "
            f"{self.pool_name!r} after {self.retries} re-sends: {last}")

    # -- requests ----------------------------------------------------------------------------

    def submit(self, request: GenerateRequest) -> Completion:
        """Answer one request, blocking this thread (safe to call from many threads)."""
        tried: set[int] = set()
        for _ in range(self.retries + 1):
            rank, handle = self._pick(tried)
            try:
                return ray.get(handle.generate.remote(request))
            except _REPLICA_LOST as exc:
                tried.add(rank)
                self._lost(rank, handle, exc)
                last = exc
            finally:
                self._release(rank)
        raise self._exhausted(request, tried, last)

    async def asubmit(self, request: GenerateRequest) -> Completion:
        """Answer one request without blocking the event loop."""
        tried: set[int] = set()
        for _ in range(self.retries + 1):
            rank, handle = await asyncio.to_thread(self._pick, tried)
            try:
                return await handle.generate.remote(request)
            except _REPLICA_LOST as exc:
                tried.add(rank)
                self._lost(rank, handle, exc)
                last = exc
            finally:
                self._release(rank)
        raise self._exhausted(request, tried, last)

    def map(self, requests: list[GenerateRequest]) -> list[Completion]:
        """Answer many requests concurrently, in order (a convenience over ``asubmit``)."""

        async def run() -> list[Completion]:
            return list(await asyncio.gather(*(self.asubmit(r) for r in requests)))

        return asyncio.run(run())
